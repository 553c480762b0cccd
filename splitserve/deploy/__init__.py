"""`splitserve deploy`: manifests for a whole deployment, rendered from one DeploySpec."""

from splitserve.deploy.config import DeploySpec
from splitserve.deploy.manifests import render_objects

__all__ = ["DeploySpec", "render_objects"]
