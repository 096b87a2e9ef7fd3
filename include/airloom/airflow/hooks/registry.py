"""RegistryHook: the model registry as Airflow sees it (S3 credentials from a connection)."""

from __future__ import annotations

from functools import cached_property

from airflow.sdk import BaseHook


class RegistryHook(BaseHook):
    """Opens :class:`airloom.registry.registry.ModelRegistry` at ``registry_uri``.

    For ``s3://`` URIs the boto3 client comes from the Amazon provider's ``S3Hook`` on
    ``aws_conn_id`` (its extra ``endpoint_url`` points at MinIO); local paths need no connection.

    :param registry_uri: a folder or ``s3://bucket/prefix``; empty means Airloom's default.
    :param aws_conn_id: the Airflow connection with S3 credentials.
    """

    conn_name_attr = "aws_conn_id"
    hook_name = "Airloom model registry"

    def __init__(self, registry_uri: str | None = None, aws_conn_id: str | None = "aws_default") -> None:
        super().__init__()
        self.registry_uri = registry_uri
        self.aws_conn_id = aws_conn_id

    @cached_property
    def uri(self) -> str:
        from airloom.settings import registry_uri

        return self.registry_uri or registry_uri()

    def get_conn(self):
        from airloom.registry.registry import ModelRegistry
        from airloom.registry.store import S3Store, open_store

        if self.uri.startswith("s3://"):
            from airflow.providers.amazon.aws.hooks.s3 import S3Hook

            bucket, _, prefix = self.uri[len("s3://") :].partition("/")
            client = S3Hook(aws_conn_id=self.aws_conn_id).get_conn()
            return ModelRegistry(S3Store(bucket, prefix, client=client))
        return ModelRegistry(open_store(self.uri))

    @cached_property
    def registry(self):
        return self.get_conn()


def aws_env_for_child(aws_conn_id: str | None = "aws_default") -> dict[str, str]:
    """The connection's S3 credentials as environment variables, for a child process (training)
    that reads or writes ``s3://`` itself and knows nothing of Airflow connections."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    hook = S3Hook(aws_conn_id=aws_conn_id)
    creds = hook.get_credentials()
    env = {"AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key}
    if creds.token:
        env["AWS_SESSION_TOKEN"] = creds.token
    if hook.conn_config.region_name:
        env["AWS_DEFAULT_REGION"] = hook.conn_config.region_name
    endpoint = hook.conn_config.get_service_endpoint_url("s3")
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return {k: v for k, v in env.items() if v}
