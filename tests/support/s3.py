"""A real S3-compatible server on loopback: MinIO, built from its Go module."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .processes import Server, free_port, tool


@dataclass
class S3Server:
    workdir: Path
    access_key: str = "sectune-test"
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    region: str = "us-east-1"
    endpoint: str = ""
    _server: Server | None = None

    def start(self) -> S3Server:
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self._server = Server(
            "minio",
            [
                tool("minio"),
                "server",
                str(self.workdir / "data"),
                "--address",
                f"127.0.0.1:{port}",
                "--console-address",
                f"127.0.0.1:{free_port()}",
                "--quiet",
            ],
            self.workdir / "minio.log",
            env={
                "MINIO_ROOT_USER": self.access_key,
                "MINIO_ROOT_PASSWORD": self.secret_key,
                "MINIO_BROWSER": "off",
                "MINIO_UPDATE": "off",
                "MINIO_REGION": self.region,
            },
        ).start()
        self._server.wait_http(f"{self.endpoint}/minio/health/live")
        return self

    def stop(self) -> None:
        if self._server:
            self._server.stop()

    def env(self) -> dict[str, str]:
        """The environment a trainer pod gets from the storage Secret."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
        }

    def client(self, secret_key: str | None = None) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
        )
