"""What the trainer writes next to each DCP checkpoint so it can be read and exported without the run.

Reading a checkpoint back is ``mllm.convert.trainer_checkpoint`` (shared with ``mllm.convert.core``).
"""

from __future__ import annotations

import json

from mllm import checkpoint_io
from mllm.convert.trainer_checkpoint import MODEL_CONFIG_FILE, RUN_CONFIG_FILE


def checkpoint_config_files(run) -> dict[str, str]:
    """{file name: text} that every checkpoint of ``run`` (a ``RunConfig``) carries."""
    from omegaconf import OmegaConf

    model = json.dumps(checkpoint_io.config_to_dict(run.model), indent=2) + "\n"
    return {MODEL_CONFIG_FILE: model, RUN_CONFIG_FILE: OmegaConf.to_yaml(OmegaConf.structured(run))}
