"""Airloom: the life of a fine-tuned language model as Apache Airflow 3 DAGs.

Importing ``airloom`` is cheap on purpose: DAG files import it at parse time, so heavy
libraries (torch, transformers, great_expectations, pandas) are imported inside functions.
"""

__version__ = "0.1.0"
