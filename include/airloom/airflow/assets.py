"""Assets shared by the DAGs: data → fine-tuning, monitoring → fine-tuning, monitoring → data.

Name-only assets: a URI with a scheme (``s3://``, ``airloom://``) makes Airflow load every
provider's URI handlers at parse time, which pulled boto3 into each DAG file's parse (~0.2 s).
"""

from airflow.sdk import Asset

PREPARED_DATASET = Asset("prepared_dataset")
RETRAINING_REQUEST = Asset("retraining_request")
# Corrected answers from feedback, as raw instruction rows; extra: path, rows, sha256, ds.
FEEDBACK_DATASET = Asset("feedback_dataset")
