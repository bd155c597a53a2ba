from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["tiny.yaml", "default.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.corpus.source == "embedded"
    assert cfg.cluster.k >= 2


def test_default_config_uses_embedded_corpus_with_six_clusters():
    cfg = load_config(CONFIGS / "default.yaml")
    assert (cfg.corpus.source, cfg.cluster.k) == ("embedded", 6)


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'cluster\.kk'.*valid keys"):
        load_config(write(tmp_path, "cluster:\n  kk: 3\n"))


def test_unknown_section_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="'clusters'"):
        load_config(write(tmp_path, "clusters:\n  k: 3\n"))


def test_wrong_type_is_an_error_naming_key_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'cluster\.k' must be int"):
        load_config(write(tmp_path, "cluster:\n  k: three\n"))


def test_bool_is_not_accepted_for_an_int_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'cluster\.k' must be int"):
        load_config(write(tmp_path, "cluster:\n  k: true\n"))


def test_int_is_accepted_for_a_float_key(tmp_path):
    cfg = load_config(write(tmp_path, "cluster:\n  temperature: 1\n"))
    assert cfg.cluster.temperature == 1.0 and isinstance(cfg.cluster.temperature, float)


def test_set_overrides_replace_file_values_with_parsed_types():
    cfg = load_config(CONFIGS / "tiny.yaml", ["cluster.k=4", "corpus.files=[a.txt, b.txt]", "ray.address=auto"])
    assert cfg.cluster.k == 4
    assert cfg.corpus.files == ["a.txt", "b.txt"]
    assert cfg.ray.address == "auto"


@pytest.mark.parametrize("value, parsed", [("true", True), ("false", False), ("auto", "auto")])
def test_a_key_of_two_kinds_takes_either_kind(value, parsed):
    cfg = load_config(CONFIGS / "tiny.yaml", [f"experts.train.compile={value}"])  # bool | Literal["auto"]
    assert cfg.experts.train["compile"] == parsed and type(cfg.experts.train["compile"]) is type(parsed)


def test_a_key_of_two_kinds_names_both_when_a_value_is_neither():
    with pytest.raises(ConfigError, match=r"'experts\.train\.compile' must be true, false or 'auto', got 1"):
        load_config(CONFIGS / "tiny.yaml", ["experts.train.compile=1"])


def test_override_of_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"'cluster\.nope'"):
        load_config(CONFIGS / "tiny.yaml", ["cluster.nope=1"])


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(CONFIGS / "tiny.yaml", ["cluster.k"])


@pytest.mark.parametrize("k", [1, 0, -3])
def test_k_below_two_is_an_error(k):
    with pytest.raises(ConfigError, match=r"cluster\.k must be at least 2"):
        load_config(CONFIGS / "tiny.yaml", [f"cluster.k={k}"])


@pytest.mark.parametrize("override, key", [
    ("corpus.source=web", "corpus.source"),
    ("corpus.encoding_errors=ignore", "corpus.encoding_errors"),
    ("cluster.top_k=7", "cluster.top_k"),
    ("cluster.temperature=0", "cluster.temperature"),
    ("corpus.val_fraction=0.95", "corpus.val_fraction"),
    ("cluster.svd_dim=0", "cluster.svd_dim"),
    ("experts.seed_num_cpus=0", "experts.seed_num_cpus"),
    ("experts.train.compile=sometimes", "experts.train.compile"),
])
def test_out_of_range_values_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_files_source_without_files_is_an_error():
    with pytest.raises(ConfigError, match="corpus.files is empty"):
        load_config(CONFIGS / "tiny.yaml", ["corpus.source=files"])


def test_a_seed_needs_the_dense_model_it_branches_from():
    with pytest.raises(ConfigError, match="experts.seed_fraction must be in \\[0, 1\\) and needs experts.dense"):
        load_config(CONFIGS / "tiny.yaml", ["experts.dense=false"])
    with pytest.raises(ConfigError, match="experts.seed_fraction"):
        load_config(CONFIGS / "tiny.yaml", ["experts.seed_fraction=1.0"])


def test_the_moved_checkpoint_dir_key_says_where_it_went(tmp_path):
    with pytest.raises(ConfigError, match="'experts.checkpoint_dir' moved: .*top-level key 'storage'.*MOIE_STORAGE"):
        load_config(write(tmp_path, "experts:\n  checkpoint_dir: /shared/ckpt\n"))


@pytest.mark.parametrize("value", ["s3:/bucket/moie", "  "])
def test_a_malformed_storage_setting_is_an_error_naming_the_key(tmp_path, value):
    with pytest.raises(ConfigError, match="config key 'storage'"):
        load_config(write(tmp_path, f"storage: '{value}'\n"))


def test_storage_from_the_environment_wins_and_file_uris_are_paths(tmp_path, monkeypatch):
    from pipeline.store.catalog import storage_location

    cfg = load_config(write(tmp_path, f"storage: {tmp_path / 'configured'}\n"))
    monkeypatch.delenv("MOIE_STORAGE", raising=False)
    assert storage_location(cfg) == str(tmp_path / "configured")
    monkeypatch.setenv("MOIE_STORAGE", f"file://{tmp_path / 'shared'}")
    assert storage_location(cfg) == str(tmp_path / "shared")
    monkeypatch.setenv("MOIE_STORAGE", "s3://bucket/moie")
    assert storage_location(cfg) == "s3://bucket/moie"
    monkeypatch.setenv("MOIE_STORAGE", "s3:bucket")
    with pytest.raises(ConfigError, match="MOIE_STORAGE 's3:bucket' looks like a URI"):
        storage_location(cfg)


@pytest.mark.parametrize("override, choices", [
    ("compose.routing=bogus", "'router', 'topk', 'adaptive'"),
    ("compose.modes=[independent, bogus]", "'independent', 'joint'"),
    ("corpus.source=web", "'embedded', 'files', 'hub'"),
    ("extend.branch=nowhere", "'central', 'seed', 'scratch'"),
    ("device=gpu", "'auto', 'cpu', 'cuda'"),
])
def test_a_choice_outside_its_literal_is_refused_naming_the_key_and_the_choices(override, choices):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}.*must be one of {choices}"):
        load_config(CONFIGS / "tiny.yaml", [override])


@pytest.mark.parametrize("text, problem", [
    ("cluster:\n  k: 3\n  k: 4\n", "duplicate key 'k'"),  # the last one would silently win
    ("a: &leaf [x, x]\nb: &twig [*leaf, *leaf]\ncluster: {k: *twig}\n", "anchors and aliases"),  # an alias bomb
    ("cluster:\n  k: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 32 levels"),
    ("cluster: {[1]: 2}\n", "a key must be a plain value"),
], ids=["duplicate-key", "alias-bomb", "deep-nesting", "unhashable-key"])
def test_yaml_a_config_never_needs_is_refused_in_one_short_line(tmp_path, text, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        load_config(write(tmp_path, text))
    assert "\n" not in str(err.value) and len(str(err.value)) < 1000


@pytest.mark.parametrize("override, problem", [
    ("cluster.k=[1", "the value is not YAML"),
    ("corpus.name=@x", "the value is not YAML"),
    ("cluster.k=" + "[" * 100_000, "nested deeper than 32 levels"),
    ("corpus.name=[" + "x" * 100_000 + "]", "must be str"),  # a huge value is cut, not echoed whole
], ids=["unclosed", "reserved-symbol", "deep-nesting", "huge-value"])
def test_a_set_value_that_is_not_usable_yaml_is_one_short_error_naming_the_override(override, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert "\n" not in str(err.value) and len(str(err.value)) < 1500


@pytest.mark.parametrize("key", ["slöt", "a b", "x/y"])
def test_a_resource_name_mlflow_or_ray_would_refuse_is_refused_at_load(key):
    with pytest.raises(ConfigError, match="experts.resources key .* must hold only ASCII letters"):
        load_config(CONFIGS / "tiny.yaml", [f"experts.resources={{'{key}': 1}}"])


@pytest.mark.parametrize("override, message", [
    ("experts.num_gpus=-1", "experts.num_gpus must be null"),
    ("experts.num_gpus=2", "a task trains or scores on one GPU"),
    ("compose.num_gpus=.inf", "compose.num_gpus must be null"),
    ("evaluate.num_gpus=true", "evaluate.num_gpus"),
])
def test_a_number_of_gpus_that_is_not_one_is_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.yaml", [override])


@pytest.mark.parametrize("section", ["experts", "compose", "evaluate", "extend"])
def test_device_cpu_with_gpus_asked_of_a_section_is_refused_naming_both(section):
    with pytest.raises(ConfigError, match=f"device is 'cpu' but {section}.num_gpus is 1"):
        load_config(CONFIGS / "tiny.yaml", ["device=cpu", f"{section}.num_gpus=1"])
    assert load_config(CONFIGS / "tiny.yaml", ["device=cpu", f"{section}.num_gpus=0"]).device == "cpu"
    with pytest.raises(ConfigError, match=f"device is 'cuda' but {section}.num_gpus is 0"):
        load_config(CONFIGS / "tiny.yaml", ["device=cuda", f"{section}.num_gpus=0"])


@pytest.mark.parametrize("overrides, message", [
    (["experts.dense_workers=0"], "experts.dense_workers must be >= 1"),
    (["experts.dense_workers=3"], r"experts.train.batch_size \(8\) must be a multiple of experts.dense_workers \(3\)"),
    (["experts.dense_workers=2", "central.arch=gpt", "central.train={batch_size: 5}"],
     r"central.train.batch_size \(5\) must be a multiple of experts.dense_workers \(2\)"),
    (["experts.dense_workers=2", "compose.num_gpus=0.5"], "each data-parallel worker takes a whole GPU"),
])
def test_data_parallel_workers_that_cannot_share_a_batch_equally_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.yaml", overrides)
    assert load_config(CONFIGS / "tiny.yaml", ["experts.dense_workers=2"]).experts.dense_workers == 2
