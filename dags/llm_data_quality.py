"""
### llm_data_quality — ingest → validate → EDA report → prepare

Reads raw instruction data (JSONL, JSON, CSV or Parquet; a file, folder or glob), validates it
with Great Expectations (rows that fail are quarantined with line and reason; the task fails
when the suite fails, and the run stops before preparation), writes an HTML EDA report of the data
as read (from the profile validation computed in the same pass; also after a failed validation), and
prepares train/validation/test Parquet splits (markup clean-up, PII policy, prompt template, token-length filter;
counts and hashes in `manifest.json`) as the next version of a named dataset,
`$AIRLOOM_HOME/datasets/<name>/<version>/` (`dataset_name`, e.g. `raw@3`; the same content as the newest
version reuses it). Emits the asset `prepared_dataset` with that identity (extra: name, version,
ref, path, dataset_hash), which starts `llm_finetune` on exactly that version. `airloom datasets` lists them.

Reports land in `$AIRLOOM_HOME/runs/llm_data_quality/<run_id>/<task_id>/`. With `AIRLOOM_ARTIFACTS=s3://…`
(workers that share no disk) each task publishes its folder to the same key in the artifact store and hands
over URIs (XCom, the event's `path`); the dataset versions live there too (`datasets/<name>/<version>/`).

**Corrected answers from feedback.** `llm_feedback_monitoring` writes the day's corrected answers
(validated, PII-free, deduplicated raw rows) to
`$AIRLOOM_HOME/data/feedback_datasets/ds=<date>/instructions.jsonl` and emits the asset
`feedback_dataset` with that `path`. Turn them into a prepared dataset version by triggering this DAG
with `source` set to the file (one day) or to the folder `…/data/feedback_datasets` (every day so far):

    airflow dags trigger llm_data_quality -c '{"source": "<AIRLOOM_HOME>/data/feedback_datasets"}'

To retrain on the original data plus the corrections, copy the file into the raw-data folder
(`$AIRLOOM_HOME/data/raw`) first. This DAG is not scheduled on `feedback_dataset`: which rows to train on
is a person's decision.
"""

from datetime import datetime

from airflow.sdk import DAG, Param

from airloom.airflow.assets import PREPARED_DATASET
from airloom.airflow.defaults import DEFAULT_ARGS, RAW_DATA
from airloom.airflow.operators.data import DataProfileOperator, PrepareDatasetOperator, ValidateDataOperator
from airloom.prompts import TEMPLATE_HELP

with DAG(
    dag_id="llm_data_quality",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args=DEFAULT_ARGS,
    tags=["airloom", "data"],
    doc_md=__doc__,
    max_active_runs=1,
    render_template_as_native_obj=True,  # params reach the operators as their own types (None, int, dict)
    params={
        "source": Param(
            RAW_DATA,
            type="string",
            minLength=1,
            title="Raw data",
            description="File, folder, glob or s3:// URI of JSONL/JSON/CSV/Parquet instruction records "
            "or conversations (OpenAI messages, ShareGPT conversations)",
        ),
        "suite": Param(
            None,
            type=["null", "string"],
            title="Validation config",
            description="YAML file of validation thresholds (empty: built-in defaults)",
        ),
        "on_bad_rows": Param("quarantine", enum=["quarantine", "fail"], title="Bad rows"),
        "field_map": Param(
            None,
            type=["null", "object"],
            title="Field mapping",
            description='Source key -> record field, e.g. {"question": "instruction", "answer": '
            '"response"} (fields: instruction, input, response, id, task); for another chat layout '
            '{"dialog": "messages", "speaker": "role", "text": "content", "bot": "assistant"}; '
            '{"instances": "expand"} reads a list of examples under one row as one row each. '
            "Empty: recognised (ours, Alpaca, Dolly, prompt/completion, OpenAI messages, ShareGPT)",
        ),
        "dataset_name": Param(
            None,
            type=["null", "string"],
            pattern="^[a-z0-9][a-z0-9._-]*$",
            title="Dataset name",
            description="The prepared dataset becomes the next version of this name (name@1, name@2, …; "
            "llm_finetune names it so). Empty: the source's file or folder name, e.g. raw for …/data/raw",
        ),
        "seed": Param(0, type="integer", minimum=0, title="Split seed"),
        "val_fraction": Param(0.1, type="number", minimum=0, maximum=0.5),
        "test_fraction": Param(0.1, type="number", minimum=0, maximum=0.5),
        "template": Param(
            "auto",
            type="string",
            minLength=1,
            title="Prompt template",
            examples=list(TEMPLATE_HELP),
            values_display=TEMPLATE_HELP,
            description="Which formats each template serves is shown with it; or the path of a "
            "Jinja2 template file (rendered in a sandbox)",
        ),
        "pii_policy": Param(
            "mask",
            enum=["mask", "drop", "keep"],
            title="PII",
            description="mask: placeholders such as <EMAIL>; drop: remove the row; keep: leave it",
        ),
        "max_seq_len": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            title="Max tokens per row",
            description="Drop rows whose prompt + response exceed this many tokens (empty: no filter)",
        ),
        "tokenizer": Param(
            "registry:airloom-tiny-base",
            type=["null", "string"],
            title="Tokenizer",
            description="Model folder or registry:NAME[/N|@ALIAS]: token lengths in the "
            "EDA report (and the suite's max_tokens), chat_template and the "
            "length filter (empty: none)",
        ),
    },
):
    validate = ValidateDataOperator(
        task_id="validate",
        source="{{ params.source }}",
        suite="{{ params.suite }}",
        on_bad_rows="{{ params.on_bad_rows }}",
        tokenizer="{{ params.tokenizer }}",  # token lengths in the profile (and bounds, if the suite sets any)
        field_map="{{ params.field_map }}",
        retries=0,
    )
    # EDA of the data as read (duplicates, PII, markup are what it is for), rendered from the profile
    # validation computed in its pass; it runs after a failed validation too, to help read why.
    eda = DataProfileOperator(
        task_id="eda_report",
        input_path="{{ params.source }}",
        scan_dir=validate.output["scan"],
        tokenizer="{{ params.tokenizer }}",
        field_map="{{ params.field_map }}",
        trigger_rule="all_done",
    )
    prepare = PrepareDatasetOperator(
        task_id="prepare",
        input_path=validate.output["accepted"],
        dataset_name="{{ params.dataset_name }}",
        source="{{ params.source }}",
        seed="{{ params.seed }}",
        val_fraction="{{ params.val_fraction }}",
        test_fraction="{{ params.test_fraction }}",
        template="{{ params.template }}",
        pii_policy="{{ params.pii_policy }}",
        max_seq_len="{{ params.max_seq_len }}",
        tokenizer="{{ params.tokenizer }}",
        near_dedup=None,  # validation quarantined the near-duplicates (its suite's near_duplicate_threshold)
        outlets=[PREPARED_DATASET],
    )
    validate >> [eda, prepare]
