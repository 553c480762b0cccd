"""Rendered objects -> YAML: one file per object in a directory, or one multi-document
stream. Files are numbered in creation order, so `kubectl apply -f DIR` (which applies a
directory's files in name order) creates the Secret and etcd before the processes that
need them."""

from __future__ import annotations

import os
import secrets
from typing import TextIO

import yaml

from splitserve.deploy.config import DeploySpec
from splitserve.deploy.manifests import render_objects


def new_secret() -> str:
    """A fresh deployment secret (256 bits), for a Secret that deploy renders itself."""
    return secrets.token_urlsafe(32)


class _Dumper(yaml.SafeDumper):
    """Writes a dict that appears twice (shared labels) out in full both times: anchors
    and aliases are valid YAML but confuse people and some tools reading manifests."""

    def ignore_aliases(self, data) -> bool:
        return True


def to_yaml(obj: dict) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def file_name(index: int, obj: dict) -> str:
    return f"{index:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def write_directory(spec: DeploySpec, out_dir: str, secret_value: str) -> list[str]:
    """Writes every object into out_dir (created if missing) and returns the paths. The
    directory must be empty: a stale file from an earlier render (a worker role or an
    etcd no longer wanted) would be applied along with the new ones."""
    os.makedirs(out_dir, exist_ok=True)
    if os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} is not empty; render into a new or empty directory so "
                              f"no stale manifest is applied with the new ones")
    paths = []
    for i, obj in enumerate(render_objects(spec, secret_value)):
        path = os.path.join(out_dir, file_name(i, obj))
        # The Secret's file holds the deployment secret: readable by its owner only.
        mode = 0o600 if obj["kind"] == "Secret" else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as f:
            f.write(to_yaml(obj))
        paths.append(path)
    return paths


def write_stream(spec: DeploySpec, out: TextIO, secret_value: str) -> None:
    out.write("---\n".join(to_yaml(obj) for obj in render_objects(spec, secret_value)))
