"""Every name moie writes into MLflow, and the functions that build and parse them.

A stage that tags a run or a registered version, or looks one up by tag, spells the key through
this module: a key typed twice is a key that can be typed wrong, and a misspelt tag is a lookup
that finds nothing, silently. The strings themselves are the store's format: registered models
of earlier runs carry them, so a value here changes only with a migration.
"""
from __future__ import annotations

import json
import re

# registered models: the expert library
EXPERT_MODEL = "moie-expert"
CENTRAL_MODEL = "moie-central"
COMPOSITION_MODEL = "moie-composition"
LIBRARY = (EXPERT_MODEL, CENTRAL_MODEL, COMPOSITION_MODEL)
CHAMPION = "champion"  # moie-composition's alias for the newest evaluated pipeline's best composition (validation)

# the experts stage's models by name (tag Tag.EXPERT): expert-<cluster>, the dense baseline, an optional central
DENSE = "dense"
DENSE_MATCHED = "dense_matched"  # the dense model trained on for the compute composition spends beyond it
CENTRAL = "central"
SEED = "seed"  # the dense model at experts.seed_fraction, which every expert branched from: a hub to compose on
EXPERT_PREFIX = "expert-"

# roles of moie-central versions (tag Tag.ROLE)
ROLE_CENTRAL = CENTRAL  # the central model trained for composition
ROLE_DENSE = DENSE  # the dense baseline, when a separate central model exists
ROLE_DENSE_CENTRAL = "dense+central"  # the dense baseline, also the central model (experts.dense without central)
ROLE_SEED = SEED
ROLE_DENSE_MATCHED = DENSE_MATCHED
CENTRAL_ROLES = (ROLE_CENTRAL, ROLE_DENSE_CENTRAL)  # what a composition may be built on, preferred first
DENSE_ROLES = (ROLE_DENSE, ROLE_DENSE_CENTRAL)


class Tag:
    """Tag keys of runs and registered versions."""
    PIPELINE = "moie.pipeline"  # the pipeline's parent run id
    STAGE = "moie.stage"  # cluster | experts | compose | evaluate | extend
    EXPERT = "moie.expert"  # a model's name within its pipeline: expert-<k>, dense, central, seed, ...
    ROLE = "moie.role"  # a moie-central version's role (ROLE_*)
    CLUSTER = "moie.cluster"  # an expert's cluster index
    CLUSTER_RUN = "moie.cluster_run"  # the clustering a model's data came from
    DOMAIN = "moie.domain"  # the corpus domain most of an expert's cluster holds
    PURITY = "moie.purity"  # that domain's share of the cluster
    MODEL_VERSION = "moie.model_version"  # on a training run: the exact URI it registered
    TOKENIZER = "moie.tokenizer"  # the tokenizer's fingerprint
    ARCH = "moie.arch"  # the model config, JSON
    SHA = "moie.sha256"  # sha256 of a version's weights file
    FILES = "moie.sha256.files"  # a version's pin: JSON {path in its folder: sha256} of every file, MLmodel included
    SEED_TOKENS = "moie.seed_tokens"  # tokens the seed was trained on before the experts branched
    NUM_CPUS = "moie.num_cpus"
    SKIPPED = "moie.skipped"  # why a model's training was skipped
    SUPERSEDED = "moie.superseded"  # a failed attempt, replaced by a later run
    CONTINUED_FROM = "moie.continued_from"  # the model a continued-training run started from
    BRANCHED_FROM = "moie.branched_from"  # the model an expert branched from, or "scratch"
    MODE = "moie.mode"  # a composition's mode: independent | joint | ...
    HUB = "moie.hub"  # a composition's hub when it is not the central model (seed)
    CENTRAL = "moie.central"  # a composition's central model, exact URI
    EXPERTS = "moie.experts"  # a composition's experts, JSON list of exact URIs
    ADDED_TO = "moie.added_to"  # a composition grown from another by one expert: the base's URI
    ADDED = "moie.added"  # ... and the added expert's URI
    MISSING_EXPERTS = "moie.missing_experts"  # a composition composed without some clusters on purpose: JSON {name: why}
    CHAMPION = "moie.champion"  # on an evaluate run: the composition it aliased champion
    EXTENSION = "moie.extension"  # every model `moie extend` registers: the extend run's id
    EXTENDS = "moie.extends"  # on an extend run: the pipeline it extends
    BASE = "moie.base"  # on an extend run: the composition it extends
    STORAGE_ROOT = "moie.storage_root"  # where a model's token files and checkpoints live (run and version tag)
    TOKENS_SHA = "moie.sha256.tokens"  # prefix: .train / .val, sha256 of a model's token files
    NODE_ID = "moie.node_id"  # the Ray node a run's task ran on
    NODES = "moie.nodes"  # every node an attempt ran on, in order
    THREADS = "moie.threads"  # the threads each attempt trained on, in order
    WORKERS = "moie.workers"  # the data-parallel workers that trained the model (its newest attempt)
    DEVICE = "moie.device"  # what the newest attempt trained on: cpu, or cuda and the GPU's name
    RESUMED_FROM = "moie.resumed_from"  # the checkpoint step a run resumed from


PREFIX = "moie."
EXPERT_NAME = re.compile(rf"^{EXPERT_PREFIX}(\d+)$")


def expert_name(cluster: int) -> str:
    """The name of cluster `cluster`'s expert: expert-<cluster>."""
    return f"{EXPERT_PREFIX}{cluster}"


def expert_cluster(name: str) -> int | None:
    """expert-<k> -> k; None for every other model name (dense, central, seed, ...)."""
    m = EXPERT_NAME.match(name)
    return int(m.group(1)) if m else None


def is_expert(name: str) -> bool:
    return expert_cluster(name) is not None


def sha_tag(artifact: str) -> str:
    """The run tag holding the sha256 of the run's artifact `artifact` (router, assignments, ...)."""
    return f"{Tag.SHA}.{artifact}"


def tokens_sha_tag(split: str) -> str:
    """The tag holding the sha256 of a model's `split` token file."""
    return f"{Tag.TOKENS_SHA}.{split}"


def tokens_index_tag(split: str) -> str:
    """The tag holding the sha256 of the block index of a model's `split` token file."""
    return f"{Tag.TOKENS_SHA}.{split}.blocks"


def extend_tag(system: str) -> str:
    """On an extend run: the exact URI of the model it registered for `system`."""
    return f"{PREFIX}extend.{system}"


def tag_key(key: str) -> str:
    """A user's tag filter key: 'domain' means moie.domain; a dotted key is taken as written."""
    return key if "." in key else f"{PREFIX}{key}"


def is_moie_tag(key: str) -> bool:
    return key.startswith(PREFIX)


def pin_tags(files: dict[str, str], kind: str) -> dict[str, str]:
    """A registered version's pin, kept in the registry (not beside the files it covers): the
    sha256 of every file of its MLflow model folder ({path: sha256}, what `log_pyfunc` returns)
    and, as its identity in composition manifests, of its weights."""
    return {Tag.FILES: json.dumps(files, sort_keys=True), Tag.SHA: files[f"data/{kind}/{kind}.safetensors"]}


def model_tags(pipeline_id: str, name: str, tokenizer: str, model: dict, files: dict[str, str]) -> dict[str, str]:
    """The tags every registered version of a trained model carries: its pipeline, its name there,
    its tokenizer's fingerprint, its model config and its pin (`files`: the sha256 of every file)."""
    return {Tag.PIPELINE: pipeline_id, Tag.EXPERT: name, Tag.TOKENIZER: tokenizer,
            Tag.ARCH: json.dumps(model, sort_keys=True), **pin_tags(files, "model")}


def carried_tags(run_tags: dict[str, str], keys: tuple[str, ...]) -> dict[str, str]:
    """What a registered version copies from its training run: the run's tags among `keys`, and the
    sha256 of its token files (Tag.TOKENS_SHA.<split>)."""
    return {k: v for k, v in run_tags.items() if k in keys or k.startswith(Tag.TOKENS_SHA)}
