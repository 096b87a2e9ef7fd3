"""Assets shared by the DAGs: data → fine-tuning, monitoring → fine-tuning."""

from airflow.sdk import Asset

PREPARED_DATASET = Asset(name="prepared_dataset", uri="airloom://datasets/prepared")
RETRAINING_REQUEST = Asset(name="retraining_request", uri="airloom://monitoring/retraining_request")
