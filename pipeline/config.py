"""Pipeline configuration: YAML files validated into dataclasses, with --set overrides.

Every key has a type; an unknown key or a value of the wrong type is a ConfigError that
names the key (`cluster.k`) and what would be valid.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from artifacts.errors import MoieError


class ConfigError(MoieError, ValueError):
    """A configuration file or override that cannot be used as given."""


# the choices of every choice-valued key, checked when a config is loaded (from_dict)
CorpusSource = Literal["embedded", "files", "hub"]
EncodingErrors = Literal["strict", "replace"]
Arch = Literal["hourglass", "gpt"]
Mode = Literal["independent", "joint"]
Routing = Literal["router", "topk", "adaptive"]
Pool = Literal["token", "prefix"]
Glue = Literal["attention", "aligned", "both"]
Output = Literal["none", "mix"]
Branch = Literal["central", "seed", "scratch"]
Device = Literal["auto", "cpu", "cuda"]
CORPUS_SOURCES = typing.get_args(CorpusSource)
ENCODING_ERRORS = typing.get_args(EncodingErrors)
EXTEND_BRANCHES = typing.get_args(Branch)


@dataclass
class CorpusConfig:
    source: CorpusSource = "embedded"  # embedded | files | hub
    name: str | None = None  # hub data set name (source: hub)
    files: list[str] = field(default_factory=list)  # .txt / .jsonl / .parquet paths or globs
    hub_split: str = "train"  # split of the hub data set to read
    text_column: str = "text"  # column holding the text (jsonl, parquet, hub)
    source_column: str | None = "source"  # optional domain label, used only for evaluation
    work_column: str | None = "work"  # optional work id: all chunks of a work share a split
    max_chunk_bytes: int = 4096  # long texts are chunked at paragraph boundaries
    domain_bytes: int = 2_500_000  # embedded corpus: cap per domain
    max_documents: int | None = None  # keep only the first N documents (null: all)
    # domains (source labels) left out of the corpus, e.g. [code]: a pipeline that has never seen
    # them, to be extended with one later (`moie extend`, bench/new_domain.py)
    exclude_sources: list[str] = field(default_factory=list)
    encoding_errors: EncodingErrors = "strict"  # strict: refuse non-UTF-8 files; replace: decode with U+FFFD and warn
    val_fraction: float = 0.05  # share of works held out for validation (split by work, never by chunk)
    test_fraction: float = 0.05  # share of works held out for the final evaluation


@dataclass
class ClusterConfig:
    k: int = 6  # number of clusters = experts
    max_features: int = 20_000  # tf-idf vocabulary bound
    min_df: int = 2  # a term must occur in this many documents
    svd_dim: int = 100  # truncated SVD dimensions of the document embedding
    fit_sample: int = 50_000  # documents used to fit tf-idf, SVD and centroids
    iterations: int = 20  # balanced Lloyd iterations
    temperature: float = 0.1  # routing weights softmax(-d^2 / T)
    top_k: int = 1  # experts kept per routed prefix
    num_cpus: int = 1  # Ray resources of the fitting task (each shard's scan and assignment task takes 1)
    crash_shard: int | None = None  # tests only: the task assigning this shard (its index) exits its worker


@dataclass
class ExpertsConfig:
    arch: Arch = "hourglass"  # hourglass | gpt
    model: dict = field(default_factory=dict)  # HourglassConfig / GPTConfig keys (vocab from the tokenizer)
    train: dict = field(default_factory=dict)  # TrainConfig keys; max_tokens is the budget of one expert
    num_cpus: float = 1.0  # Ray resources of one expert's task
    num_gpus: float | None = None  # GPU share of one expert's task, <= 1 (null: by `device`; 0.5 puts two on a GPU)
    max_retries: int = 3  # Ray retries of a task whose worker died; it resumes from its checkpoint
    resources: dict = field(default_factory=dict)  # custom Ray resources of one expert's task, e.g. {expert_slot: 1}
    dense: bool = True  # also train the dense baseline (k x the expert budget); it is the central model
    # BTM / cBTM: experts branch from a shared seed, the dense model after this share of its
    # budget; each expert then trains (its budget - seed / k) tokens, so the total stays equal
    seed_fraction: float = 0.0
    # Ray CPUs of the seed's task (null: num_cpus). Nothing else can start while the seed trains,
    # so it may take the cores the experts will use: on 2 cores, 2 threads train the seed 1.3x
    # faster than one (bench/profile_expert_step.py --threads). Capped at the largest node's CPUs.
    seed_num_cpus: float | None = None
    # data-parallel workers (Ray Train, gloo on CPU, NCCL on GPU) of each model trained on the whole
    # corpus: the dense model (its seed phase too), a central model of its own, dense_matched. Each
    # worker takes its section's num_cpus (and a whole GPU where the section asks for GPUs) and an
    # equal share of every batch (batch_size: a multiple of N)
    dense_workers: int = 1
    progress_every: float = 5.0  # seconds between progress lines in the terminal
    # tests only: a local directory; each training task, once its first checkpoint is written,
    # writes <name>.held there ({"pid", "step"}) and waits until <dir>/release exists. A test that
    # interrupts training thus knows training is still going, whatever the machine's speed.
    hold: str | None = None


@dataclass
class CentralConfig:
    """A central model of its own; by default (arch null) the dense baseline is the central model."""
    arch: Arch | None = None  # hourglass | gpt | null
    model: dict = field(default_factory=dict)  # its HourglassConfig / GPTConfig keys
    train: dict = field(default_factory=dict)  # max_tokens here is the central model's own budget


KWAY_TRAIN = {"max_tokens": 204_800, "batch_size": 8, "lr": 1e-2}  # the k-way gate's phase; keys a config may set


@dataclass
class ComposeConfig:
    modes: list[Mode] = field(default_factory=lambda: ["independent", "joint"])  # one run (and version) each
    n_points: int = 2  # composition points spread over the central model's depth
    # inference routing of independent compositions: router (the experts' cBTM router picks per
    # token from the text so far, each expert's gate scales its block) | topk | adaptive (gates)
    routing: Routing = "router"
    k: int = 2  # experts per token (top-k routing)
    threshold: float = 0.5  # adaptive routing: a token takes every expert whose gate exceeds it
    pool: Pool = "token"  # what routing looks at: each token's state, or the running mean of its prefix
    # what a block reads of its expert: attention (CALM: every expert row the position may see) |
    # aligned (the expert's state at the aligned position, one projection) | both
    glue: Glue = "both"
    # a composition point in output space (independent mode): "mix" blends each position's
    # next-byte distribution with its routed expert's own, by a learned per-position gate | none
    output: Output = "mix"
    # a k-way gate over every expert, trained once they are all done with every cluster's text as
    # the others' negatives (routing "kway": evaluate scores it as composed_independent_kway)
    kway: bool = True
    kway_train: dict = field(default_factory=lambda: dict(KWAY_TRAIN))  # 100 steps of 8 windows
    # tokens whose mean central state centers the routing (0: uncentred): an equal share drawn at
    # random from each expert's training data, so the centre is the mean over clusters, not one domain
    center_tokens: int = 32_768
    blocks_train: dict = field(default_factory=dict)  # independent: an expert's blocks (TrainConfig keys)
    # then its gates: about 100 steps, as PHATGOOSE trains them (steps = max_tokens / (batch x block))
    gates_train: dict = field(default_factory=lambda: {"max_tokens": 102_400, "batch_size": 4, "lr": 5e-3})
    # then (output "mix") its output gate: d_c + d_e + 1 parameters, 100 steps
    mix_train: dict = field(default_factory=lambda: {"max_tokens": 102_400, "batch_size": 4, "lr": 1e-2})
    joint_train: dict = field(default_factory=dict)  # joint: all blocks and gates
    balance_weight: float = 0.01  # joint: weight of the load-balancing loss
    num_cpus: float = 1.0  # Ray resources of one composition task
    num_gpus: float | None = None  # GPUs of one composition task and of dense_matched's (null: by `device`)
    eval_tokens: int = 65_536  # validation tokens scored for composed vs central
    early: bool = True  # moie run: each expert's blocks and gates start once it (and the central model) is registered
    early_tasks: int = 1  # at most this many of those at once while experts train (the rest wait their turn)
    # the dense model trained on (its own data, its schedule) for the compute the composed systems
    # spend beyond it, so "composition vs training the dense model longer" compares equal compute
    dense_matched: bool = True
    # compose without the experts a clustering lacks (deleted, or skipped as too small), recording the
    # gap; off: such a composition is refused (it is another system than the pipeline's)
    allow_missing_experts: bool = False


@dataclass
class EvaluateConfig:
    max_bytes_per_domain: int = 49_152  # held-out bytes scored per domain (whole documents, in order)
    # near-duplicates: a held-out document whose bytes are covered by training shingles of
    # shingle_words words above this share is dropped (1: keep every document)
    max_overlap: float = 0.5
    shingle_words: int = 8  # words in a shingle (a run of words held-out text shares with training text)
    # the training shingles in a Bloom filter of this many MB (a power of two), whatever the corpus's
    # size; it reports its false-positive rate (bench/overlap.py). 0: the exact set, ~1.3x the training text
    shingle_filter_mb: int = 64
    bootstrap: int = 2000  # paired bootstrap resamples (over documents) of every difference reported
    stride: int = 0  # window overlap: each window adds `stride` new bytes (0: half the block size)
    batch_size: int = 8  # windows scored at once
    num_cpus: float = 1.0  # Ray resources of one scoring task
    num_gpus: float | None = None  # GPUs of one scoring task (null: by `device`)

    def scoring(self):
        """The one way moie scores documents (composition.evaluation.Scoring), as configured here:
        evaluate's held-out scoring and compose's validation alike."""
        from composition.evaluation import Scoring
        from experts.tokenizer import EOS_ID

        return Scoring(eos_id=EOS_ID, stride=self.stride or None, batch_size=self.batch_size)




@dataclass
class ExtendConfig:
    """`moie extend`: a new domain added to a finished pipeline, and the baselines it is measured against."""
    # the new expert starts from the pipeline's central model, its seed (where its experts branched),
    # or from scratch (then `model` may make it smaller than the others)
    branch: Branch = "central"
    model: dict = field(default_factory=dict)  # branch scratch: the new expert's model keys over experts.model
    train: dict = field(default_factory=dict)  # TrainConfig keys over experts.train; max_tokens: its budget
    # fine-tune the central model on the new text (finetune) and with a replay share of the old
    # domains' training text (finetune_replay), each for the training compute the composition adds
    baselines: bool = True
    replay: float = 0.2  # finetune_replay: the share of its training windows drawn from the old domains
    old_bytes_per_domain: int = 16_384  # held-out bytes scored per old domain (the new one: evaluate's)
    mixed_chunk: int = 512  # mixed documents: chunks of this many bytes, new and old text in turn
    num_cpus: float = 1.0  # Ray resources of each training and scoring task
    num_gpus: float | None = None  # GPUs of the new expert's, the baselines' and the scoring tasks (null: by `device`)


@dataclass
class TrackingConfig:
    experiment: str = "moie"  # MLflow experiment of the pipeline's runs
    uri: str | None = None  # MLFLOW_TRACKING_URI wins; default sqlite under the workdir


@dataclass
class RayConfig:
    address: str | None = None  # RAY_ADDRESS wins; default: start a local instance
    num_cpus: int | None = None  # CPUs of a local instance (default: all)


@dataclass
class Config:
    name: str = "moie"  # names the pipeline's parent run (pipeline-<name>)
    seed: int = 0  # every random choice (splits are by hash, not by seed)
    workdir: str | None = None  # MLflow database + artifacts; default $MOIE_HOME or ~/.moie
    storage: str | None = None  # token files, checkpoints, seed: a directory or s3://bucket/prefix; MOIE_STORAGE wins
    shared_filesystem: bool = False  # every Ray node mounts the local paths in use (NFS): multi-node may use them
    # where every task that trains or scores runs: auto (a GPU where the Ray cluster has one: each such
    # task asks for <section>.num_gpus, default 1), cpu, or cuda (the same, and an error where no node has a GPU)
    device: Device = "auto"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    central: CentralConfig = field(default_factory=CentralConfig)
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    extend: ExtendConfig = field(default_factory=ExtendConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


MOVED = {"experts.checkpoint_dir": "config key 'experts.checkpoint_dir' moved: name the storage of token files and "
                                   "checkpoints with the top-level key 'storage' (a directory or s3://bucket/prefix), "
                                   "or MOIE_STORAGE"}


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file, apply `section.key=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; configs/ holds tiny.yaml and default.yaml")
    try:
        data = read_yaml(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {shown(e, 600)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    for item in overrides or []:
        apply_override(data, item)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def apply_override(data: dict, item: str) -> None:
    """Apply one `section.key=value` override (value parsed as YAML) to a raw config dict."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {shown(item)} must look like section.key=value, e.g. cluster.k=6")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {shown(item)}: {part!r} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {shown(item)}: the value is not YAML ({shown(e, 400)}); quote text that "
                          "holds ': ' or starts with a YAML symbol, e.g. name='a: b'") from None


MAX_YAML_DEPTH = 32  # no moie config nests deeper than 4; recursion on deeper input would crash the parser


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no tags run) that also refuses what a config never needs and an attack
    uses: duplicate keys (the last would silently win), anchors and aliases (a few lines of
    aliases expand to gigabytes), and nesting deeper than MAX_YAML_DEPTH."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            raise yaml.composer.ComposerError(None, None, "YAML anchors and aliases (&name, *name) are not accepted "
                                              "in a moie config: write the value out", self.peek_event().start_mark)
        self.depth = getattr(self, "depth", 0) + 1
        if self.depth > MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                              self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, collections.abc.Hashable):
                raise yaml.constructor.ConstructorError(None, None, f"a key must be a plain value, got {shown(key)}",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {shown(key)}: each key once",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str):
    """A config's YAML (StrictLoader)."""
    return yaml.load(text, Loader=StrictLoader)


def shown(value, limit: int = 200) -> str:
    """repr(value), cut to `limit` characters: an error message never echoes a huge value."""
    text = repr(value) if not isinstance(value, BaseException) else " ".join(str(value).split())  # one line
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    moved = [MOVED[prefix + k] for k in unknown if prefix + k in MOVED]
    if moved:
        raise ConfigError(moved[0])
    if unknown:
        raise ConfigError(f"unknown config key {(prefix + unknown[0])!r}; valid keys here: {', '.join(names)}")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def described(tp: Any) -> str:
    """A type as a config author writes its values: true, false / 'auto' / int."""
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    return "true, false" if tp is bool else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(map(repr, choices))}, got {shown(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        for alternative in inner:  # e.g. bool | Literal["auto"]: the first kind the value has
            try:
                return _coerce(value, alternative, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key {key!r} must be {' or '.join(map(described, inner))}, got {shown(value)}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list of {getattr(inner, '__name__', inner)}, "
                              f"got {shown(value)}")
        return [_coerce(v, inner, key) for v in value]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {shown(value)}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"config key {key!r} must be {tp.__name__}, got {shown(value)} ({type(value).__name__})")
    return value


def validate(cfg: Config) -> None:
    """Check value ranges that types alone do not capture."""
    c, k = cfg.corpus, cfg.cluster
    if cfg.storage is not None:
        check_storage(cfg.storage, "config key 'storage'")
    if c.source == "hub" and not c.name:
        raise ConfigError("corpus.source is 'hub' but corpus.name is empty; set corpus.name=<dataset id>")
    if c.source == "files" and not c.files:
        raise ConfigError("corpus.source is 'files' but corpus.files is empty; list .txt/.jsonl/.parquet paths")
    if not (0 <= c.val_fraction < 1 and 0 <= c.test_fraction < 1 and c.val_fraction + c.test_fraction < 1):
        raise ConfigError("corpus.val_fraction and corpus.test_fraction must be in [0, 1) and sum to less than 1, "
                          f"got {c.val_fraction} and {c.test_fraction}")
    _positive(cfg, ["corpus.max_chunk_bytes", "corpus.domain_bytes", "cluster.max_features", "cluster.min_df",
                    "cluster.svd_dim", "cluster.fit_sample", "cluster.iterations", "cluster.num_cpus"])
    if c.max_chunk_bytes < 64:
        raise ConfigError(f"corpus.max_chunk_bytes must be at least 64 (a chunk is a paragraph or so), "
                          f"got {c.max_chunk_bytes}")
    if k.k < 2:
        raise ConfigError(f"cluster.k must be at least 2 (one cluster is the dense model), got {k.k}")
    if not 1 <= k.top_k <= k.k:
        raise ConfigError(f"cluster.top_k must be between 1 and cluster.k={k.k}, got {k.top_k}")
    if not 0 < k.temperature < math.inf:
        raise ConfigError(f"cluster.temperature must be > 0 and finite, got {k.temperature}")
    if c.max_documents is not None and c.max_documents < 1:
        raise ConfigError(f"corpus.max_documents must be null (all documents) or >= 1, got {c.max_documents}")
    validate_experts(cfg.experts, cfg.central.train if cfg.central.arch else {})
    validate_gpus(cfg)
    if not cfg.compose.modes:
        raise ConfigError("compose.modes must name at least one of 'independent' and 'joint', got []")
    kway = {**KWAY_TRAIN, **cfg.compose.kway_train}
    if set(kway) != set(KWAY_TRAIN) or not (kway["max_tokens"] >= 1 and kway["batch_size"] >= 1 and kway["lr"] > 0):
        raise ConfigError("compose.kway_train takes max_tokens >= 1, batch_size >= 1 and lr > 0, got "
                          f"{cfg.compose.kway_train}")
    mb = cfg.evaluate.shingle_filter_mb
    if mb < 0 or mb & (mb - 1):
        raise ConfigError(f"evaluate.shingle_filter_mb must be a power of two (e.g. 64, 256) or 0 for the exact "
                          f"shingle set; got {mb}")
    if not 0 <= cfg.evaluate.max_overlap <= 1 or cfg.evaluate.shingle_words < 1 or cfg.evaluate.bootstrap < 1:
        raise ConfigError("evaluate.max_overlap must be between 0 and 1 (1: keep every held-out document), "
                          "evaluate.shingle_words >= 1 and evaluate.bootstrap >= 1; got "
                          f"{cfg.evaluate.max_overlap}, {cfg.evaluate.shingle_words}, {cfg.evaluate.bootstrap}")
    for phase in ("blocks_train", "gates_train", "mix_train", "joint_train"):
        validate_train_section(f"compose.{phase}", getattr(cfg.compose, phase))
    if not 1 <= cfg.compose.n_points or not 1 <= cfg.compose.k or not 0 <= cfg.compose.threshold <= 1:
        raise ConfigError("compose.n_points and compose.k must be >= 1 (compose.k = 0 would route to no expert) and "
                          f"compose.threshold in [0, 1]; got {cfg.compose.n_points}, {cfg.compose.k}, "
                          f"{cfg.compose.threshold}")
    if cfg.compose.num_cpus <= 0 or cfg.compose.eval_tokens < 1 or cfg.compose.balance_weight < 0:
        raise ConfigError("compose.num_cpus must be > 0, compose.eval_tokens >= 1 and compose.balance_weight >= 0; "
                          f"got {cfg.compose.num_cpus}, {cfg.compose.eval_tokens}, {cfg.compose.balance_weight}")
    if cfg.compose.early_tasks < 1:
        raise ConfigError(f"compose.early_tasks must be at least 1, got {cfg.compose.early_tasks}")
    if cfg.compose.center_tokens < 0:
        raise ConfigError(f"compose.center_tokens must be >= 0 (0: uncentred routing), got {cfg.compose.center_tokens}")
    ev = cfg.evaluate
    if ev.max_bytes_per_domain < 1 or ev.stride < 0 or ev.batch_size < 1 or ev.num_cpus <= 0:
        raise ConfigError("evaluate.max_bytes_per_domain and evaluate.batch_size must be >= 1, evaluate.stride >= 0 "
                          f"(0: half the block size), evaluate.num_cpus > 0; got {ev}")
    if cfg.central.arch is not None:
        validate_model_section("central", cfg.central.arch, cfg.central.model, cfg.central.train)
    validate_extend(cfg)


def validate_extend(cfg: Config) -> None:
    x = cfg.extend
    if x.model and x.branch != "scratch":
        raise ConfigError(f"extend.model sets the new expert's own shape, which needs extend.branch: scratch (a "
                          f"branch of the {x.branch} model has its shape); got {x.model}")
    validate_model_section("extend", cfg.experts.arch, {**cfg.experts.model, **x.model},
                           {**cfg.experts.train, **x.train})
    if not 0 <= x.replay < 1 or x.old_bytes_per_domain < 1 or x.mixed_chunk < 1 or x.num_cpus <= 0:
        raise ConfigError("extend.replay must be in [0, 1), extend.old_bytes_per_domain and extend.mixed_chunk "
                          f">= 1 and extend.num_cpus > 0; got {x.replay}, {x.old_bytes_per_domain}, "
                          f"{x.mixed_chunk}, {x.num_cpus}")


def validate_model_section(section: str, arch: str, model: dict, train: dict) -> None:
    """`section`.model must build a model of `arch` and `section`.train a TrainConfig, every
    key known and of its type (imported lazily: loading a config stays light)."""
    from experts.checkpoint import build_model
    from experts.gpt import GPTConfig
    from experts.hourglass import HourglassConfig

    if arch not in ("hourglass", "gpt"):
        raise ConfigError(f"{section}.arch must be 'hourglass' or 'gpt', got {arch!r}")
    model_cls = HourglassConfig if arch == "hourglass" else GPTConfig
    try:
        from_dict(model_cls, {k: v for k, v in model.items() if k != "vocab_size"}, f"{section}.model.")
        build_model({"arch": arch, **model})
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{section}.model does not build a {arch}: {err}") from None
    validate_train_section(f"{section}.train", train)


def validate_train_section(section: str, train: dict) -> None:
    """`section` must be TrainConfig keys of the right types and ranges."""
    from experts.trainer import TrainConfig

    try:
        from_dict(TrainConfig, train, f"{section}.")
    except ConfigError:
        raise
    except ValueError as err:  # TrainConfig's own range check names the field
        raise ConfigError(f"{section}.{err}") from None


def validate_experts(e: "ExpertsConfig", central_train: dict | None = None) -> None:
    validate_model_section("experts", e.arch, e.model, e.train)
    if not 0 <= e.seed_fraction < 1 or (e.seed_fraction and not e.dense):
        raise ConfigError(f"experts.seed_fraction must be in [0, 1) and needs experts.dense: true (the seed is the "
                          f"dense model's early checkpoint); got {e.seed_fraction} with dense={e.dense}")
    if not 0 < e.progress_every < math.inf:
        raise ConfigError(f"experts.progress_every must be > 0 seconds and finite, got {e.progress_every}")
    if e.num_cpus <= 0 or e.max_retries < 0:
        raise ConfigError("experts.num_cpus must be > 0 and experts.max_retries >= 0; got "
                          f"{e.num_cpus}, {e.max_retries}")
    if e.dense_workers < 1:
        raise ConfigError(f"experts.dense_workers must be >= 1 (1: one process trains the dense model), got "
                          f"{e.dense_workers}")
    for section, train in (("experts", e.train), ("central", central_train or {})):
        if train.get("batch_size", 16) % e.dense_workers:
            raise ConfigError(f"{section}.train.batch_size ({train.get('batch_size', 16)}) must be a multiple of "
                              f"experts.dense_workers ({e.dense_workers}): each worker takes an equal share of a batch")
    if e.seed_num_cpus is not None and (isinstance(e.seed_num_cpus, bool) or not 0 < e.seed_num_cpus < math.inf):
        raise ConfigError(f"experts.seed_num_cpus must be null (experts.num_cpus) or a number of CPUs > 0, got "
                          f"{e.seed_num_cpus!r}")
    for name, amount in e.resources.items():
        if not re.fullmatch(r"[A-Za-z0-9_\-.]+", str(name)):  # as Ray and MLflow (a param key) take it
            raise ConfigError(f"experts.resources key {name!r} must hold only ASCII letters, digits, '_', '-' and "
                              "'.', e.g. expert_slot")
        if name in ("CPU", "GPU", "memory") or isinstance(amount, bool) or not isinstance(amount, (int, float)) \
                or not 0 < amount < math.inf:
            raise ConfigError(f"experts.resources maps custom Ray resource names to amounts > 0 (CPUs and GPUs "
                              f"are experts.num_cpus / num_gpus); got {name}: {amount!r}")


GPU_SECTIONS = ("experts", "compose", "evaluate", "extend")  # each has num_gpus: its tasks train or score


def validate_gpus(cfg: Config) -> None:
    """Each section's num_gpus is null (by `device`) or a share of one GPU (whole GPUs for
    data-parallel workers); device cpu asks for none, device cuda for some."""
    for section in GPU_SECTIONS:
        gpus = getattr(cfg, section).num_gpus
        if gpus is not None and not 0 <= gpus <= 1:
            raise ConfigError(f"{section}.num_gpus must be null (by the top-level key 'device') or a share of one GPU "
                              f"between 0 and 1 (a task trains or scores on one GPU; 0.5: two tasks share it), got "
                              f"{gpus!r}")
        if cfg.experts.dense_workers > 1 and section in ("experts", "compose") and gpus not in (None, 0, 1):
            raise ConfigError(f"{section}.num_gpus is {gpus:g} but experts.dense_workers is "
                              f"{cfg.experts.dense_workers}: each data-parallel worker takes a whole GPU (NCCL puts "
                              f"one worker on a GPU); set {section}.num_gpus to 1 or null, or experts.dense_workers=1")
        if cfg.device == "cpu" and gpus:
            raise ConfigError(f"device is 'cpu' but {section}.num_gpus is {gpus:g}: set device=auto (or cuda) to "
                              f"train and score on GPUs, or {section}.num_gpus=0")
        if cfg.device == "cuda" and gpus == 0:
            raise ConfigError(f"device is 'cuda' but {section}.num_gpus is 0: set {section}.num_gpus to the GPUs of "
                              "one task (null: 1), or device=auto")


def check_storage(value: str, what: str) -> None:
    """A storage setting is a directory or a URI with a scheme and '://' (s3://bucket/prefix)."""

    if not value.strip():
        raise ConfigError(f"{what} is empty; give a directory or an object-store URI such as s3://bucket/prefix")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:(?!//)", value):
        raise ConfigError(f"{what} {value!r} looks like a URI without '//'; write s3://bucket/prefix (or a "
                          "directory path)")


def _positive(cfg: Config, keys: list[str]) -> None:
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {value}")


def to_dict(cfg: Config) -> dict:
    """The config as plain data (for logging and for shipping to Ray tasks)."""
    return dataclasses.asdict(cfg)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'cluster': {'k': 6}} -> {'cluster.k': 6} (MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
