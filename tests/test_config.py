import json

import pytest

from rgnn.train.config import TrainConfig, build_parser, load_file, parse_args, resolve


def test_defaults_depend_on_data():
    syn, _ = parse_args([])
    assert syn.dataset == "synthetic" and syn.model.backbone == "small"
    coco, _ = parse_args(["--coco-root", "/data/coco"])
    assert coco.model.backbone == "vgg16" and coco.schedule.epochs == [10, 10, 10, 20]  # the paper's, section 4.2
    assert (coco.data.train_split, coco.data.val_split) == ("train2017", "val2017")
    voc, _ = parse_args(["--voc-root", "/data/VOC2007"])
    assert (voc.data.train_split, voc.data.val_split) == ("trainval", "test")


def test_file_then_flags_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gate: feature\nlr: 0.001\nepochs: [1, 2, 3, 4]\n")
    cfg, summary = parse_args(["--config", str(f), "--lr", "0.01", "--summary", "s.json"])
    assert (cfg.model.gate, cfg.schedule.lr, cfg.schedule.epochs, summary) == ("feature", 0.01, [1, 2, 3, 4], "s.json")


def test_saved_config_round_trips(tmp_path):
    cfg, _ = parse_args(["--gate", "none", "--epochs", "1,0,0,2"])
    f = tmp_path / "c.json"
    f.write_text(json.dumps(cfg.to_flat()))
    again, _ = parse_args(["--config", str(f)])
    assert again == cfg


@pytest.mark.parametrize("argv, match", [
    (["--coco-root", "a", "--voc-root", "b"], "at most one"),
    (["--start-stage", "joint"], "init-checkpoint"),
])
def test_bad_settings(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


def test_gate_iou_is_eq8s_theta_the_papers_by_default(tmp_path):
    assert parse_args([])[0].schedule.gate_iou == 0.5
    assert parse_args(["--gate-iou", "0.3"])[0].schedule.gate_iou == 0.3
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"gate_iou": 1.5}))  # a settings file is bounded as the flag is
    with pytest.raises(ValueError, match="gate_iou=1.5"):
        parse_args(["--config", str(path)])


def test_bad_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"gate": "region", "typo_field": 1}))
    with pytest.raises(ValueError, match="typo_field"):
        load_file(f)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_file(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="lambda_schedule"):
        resolve(TrainConfig.from_flat(lambda_schedule="sawtooth"))
    with pytest.raises(ValueError, match="four counts"):  # from a file; the flag is refused by argparse
        resolve(TrainConfig.from_flat(epochs=[1, 2, 3]))


def test_flat_params_are_strings():
    cfg, _ = parse_args(["--smoke-test"])
    flat = cfg.flat()
    assert all(isinstance(v, str) for v in flat.values())
    assert json.loads(flat["epochs"]) == cfg.schedule.epochs


def test_flat_names_reach_their_sub_config():
    cfg = TrainConfig.from_flat(gate="feature", lambda_schedule="cosine", max_regions=7, workers=3,
                                tracking_uri="sqlite:///x.db", coco_root="/c")
    assert (cfg.model.gate, cfg.schedule.lambdas.family, cfg.input.max_regions) == ("feature", "cosine", 7)
    assert (cfg.cluster.workers, cfg.tracking.tracking_uri, cfg.dataset) == (3, "sqlite:///x.db", "coco")
    assert TrainConfig.from_flat(cfg.to_flat()) == cfg
    changed = cfg.copy(gate="none")
    assert changed.model.gate == "none" and cfg.model.gate == "feature"  # a copy, not a view
    with pytest.raises(ValueError, match="typo"):
        TrainConfig.from_flat(typo=1)


def test_flag_choices_come_from_the_library_tuples():
    from rgnn.nn.backbones import BACKBONES
    from rgnn.nn.model import GATES, POOL_LAYERS
    from rgnn.train.schedule import LAMBDA_FAMILIES

    actions = {a.dest: a for a in build_parser()._actions}
    assert actions["gate"].choices is GATES and actions["pool_layer"].choices is POOL_LAYERS
    assert actions["backbone"].choices is BACKBONES and actions["lambda_schedule"].choices is LAMBDA_FAMILIES


def test_every_setting_has_one_flag_declared_once_and_its_choices_bind_settings_files_too(tmp_path):
    from rgnn.train.config import FILE_ONLY, FLAGS, FLAT_NAMES

    assert set(FLAGS) - {"config", "summary"} == set(FLAT_NAMES) - set(FILE_ONLY)
    actions = {a.dest: a for a in build_parser()._actions}
    assert set(actions) - {"help"} == set(FLAGS)
    assert actions["flip"].nargs == 0 and actions["flip"].const is True  # a bool setting's flag switches it on
    assert actions["photos"].choices == ("main", "alt") and actions["git_commit"].metavar == "SHA"
    for setting, value in (("photos", "other"), ("recipe", "fast"), ("scales", 3)):  # a file gets the flag's choices
        path = tmp_path / f"{setting}.json"
        path.write_text(json.dumps({setting: value}))
        with pytest.raises(ValueError, match=f"{setting}={value!r}: expected one of"):
            parse_args(["--config", str(path)])


def test_gate_target_is_a_setting_checked_against_the_gate():
    cfg, _ = parse_args(["--gate", "feature", "--gate-target", "class"])
    assert cfg.schedule.gate_target == "class"
    assert parse_args([])[0].schedule.gate_target == "region"  # eq. 8 as the paper writes it
    for argv in (["--gate", "region", "--gate-target", "class"],
                 ["--gate", "feature", "--pool-layer", "fc7", "--gate-target", "class"]):
        with pytest.raises(ValueError, match="gate-target class"):
            parse_args(argv)


def test_recipe_follows_the_backbone_initialisation_on_any_data():
    builtin, _ = parse_args([])  # the built-in set: the pretrained stand-in, fine-tuned at the paper's rate per image
    assert (builtin.model.weights, builtin.recipe, builtin.schedule.batch_size) == ("standin", "fine-tune", 16)
    assert builtin.schedule.lr == pytest.approx(1e-4 / 2 * 16) and builtin.model.dropout == 0.1
    assert builtin.input.max_regions == 128 and builtin.chosen["lr"] == builtin.schedule.lr
    coco, _ = parse_args(["--coco-root", "/data/coco"])  # the paper's setting exactly
    assert (coco.model.weights, coco.recipe, coco.schedule.lr, coco.schedule.batch_size, coco.model.dropout) == (
        "imagenet", "fine-tune", 1e-4, 2, 0.5)
    small, _ = parse_args(["--coco-root", "/data/coco", "--backbone", "small"])  # the small CNN's "ImageNet" is the stand-in
    assert (small.model.weights, small.recipe, small.schedule.lr) == ("standin", "fine-tune", pytest.approx(8e-4))
    scratch, _ = parse_args(["--coco-root", "/data/coco", "--backbone", "small", "--weights", "none"])  # from scratch
    assert (scratch.model.weights, scratch.recipe, scratch.schedule.lr, scratch.model.dropout) == ("none", "scratch", 1e-3, 0.1)
    assert scratch.input.image_size == 192 and scratch.schedule.batch_size == 16  # the small CNN's input
    half, _ = parse_args(["--weights", "none", "--batch-size", "8"])  # the rate scales with the batch
    assert half.schedule.lr == pytest.approx(5e-4)
    mine, _ = parse_args(["--weights", "none", "--lr", "0.01"])  # what the user sets wins; the rest follows
    assert (mine.recipe, mine.schedule.lr, mine.model.dropout) == ("scratch", 0.01, 0.1) and "lr" not in mine.chosen
    with pytest.raises(ValueError, match="recipe"):
        resolve(TrainConfig.from_flat(recipe="adhoc"))

def test_credentials_never_reach_params_or_files():
    secret_uris = {"tracking_uri": "postgresql://alice:hunter2@db:5432/mlflow",
                   "storage": "s3://AKIAKEY:wJalrSECRET@minio:9000/runs?token=tok123",
                   "init_checkpoint": "https://h/ckpt.pt?X-Amz-Signature=sig456&v=1"}
    cfg = TrainConfig.from_flat(secret_uris)
    for text in (json.dumps(cfg.flat()), json.dumps(cfg.to_flat(redacted=True))):
        for secret in ("alice", "hunter2", "AKIAKEY", "wJalrSECRET", "tok123", "sig456"):
            assert secret not in text
        assert "db:5432/mlflow" in text and "minio:9000/runs" in text and "v=1" in text  # the rest is kept
    assert cfg.to_flat()["storage"] == secret_uris["storage"]  # in memory: the real value
    from rgnn.io.redaction import redact
    assert redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db" and redact("runs") == "runs"


def test_unreachable_server_error_hides_the_password():
    from rgnn.tracking.runs import check_reachable

    with pytest.raises(ConnectionError) as e:
        check_reachable("http://bob:pa55word@127.0.0.1:9/", timeout=1)
    assert "pa55word" not in str(e.value) and "127.0.0.1:9" in str(e.value)


def test_every_tracking_scheme_that_cannot_work_fails_at_once(tmp_path):
    """A database server that does not answer (a port nothing listens on), a SQLite file in a missing
    folder: named within seconds, before any work; an HTTP server with user info in its URI that does
    answer passes."""
    import http.server
    import threading
    import time

    import services
    from rgnn.tracking.runs import check_reachable

    port = services.free_port()  # nothing listens there: the connection is refused at once
    for uri in (f"postgresql://bob:pa55word@127.0.0.1:{port}/mlflow", f"mysql+pymysql://bob:pa55word@127.0.0.1:{port}/m",
                f"postgresql+psycopg://127.0.0.1:{port}/mlflow"):
        t = time.monotonic()
        with pytest.raises(ConnectionError) as e:
            check_reachable(uri, timeout=2)
        assert time.monotonic() - t < 10 and f"127.0.0.1:{port}" in str(e.value) and "pa55word" not in str(e.value)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        check_reachable(f"sqlite:///{tmp_path}/missing/mlflow.db")
    check_reachable(f"sqlite:///{tmp_path}/mlflow.db")

    seen = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_reachable(f"http://bob:pa55word@127.0.0.1:{server.server_port}/", timeout=5)
    finally:
        server.shutdown()
    assert seen == [("/health", "Basic Ym9iOnBhNTV3b3Jk")]  # bob:pa55word


@pytest.mark.parametrize("flag,value", [
    ("--epochs", "1,2,3"), ("--epochs", "1,-1,1,1"), ("--lr", "nan"), ("--lr", "0"), ("--lr", "-1e-3"),
    ("--batch-size", "0"), ("--batch-size", "2.5"), ("--workers", "0"), ("--max-failures", "-1"),
    ("--cpus-per-worker", "-1"), ("--dropout", "1"), ("--image-size", "20000"), ("--max-regions", "-3"),
    ("--scales", "3"), ("--synthetic-train", "0"), ("--warmup", "inf"), ("--name", "../x"), ("--name", "a/b"),
    ("--git-commit", "main"), ("--git-commit", ""), ("--gate-iou", "1"), ("--gate-iou", "-0.1")])
def test_bad_flag_values_are_argparse_errors_naming_the_flag(flag, value, capsys):
    from rgnn.train.config import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args([flag, value])
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_storage_errors_never_show_a_uris_credentials():
    """What a store raises about s3://KEY:SECRET@bucket/... (botocore names `KEY:SECRET@bucket` bare)."""
    from rgnn.io import storage
    from rgnn.io.redaction import scrub

    uri = "s3://AKIDEXAMPLE:wJalrSECRET@bucket/shards/train2017"
    cases = [FileNotFoundError(f"no such key {uri}"), PermissionError("denied: AKIDEXAMPLE:wJalrSECRET@bucket"),
             RuntimeError("Invalid bucket name AKIDEXAMPLE:wJalrSECRET@bucket: ...")]
    for raised in cases:
        with pytest.raises((FileNotFoundError, PermissionError, OSError)) as e:
            with storage.errors(uri):
                raise raised
        assert "wJalrSECRET" not in str(e.value) and "AKIDEXAMPLE" not in str(e.value)
        assert "bucket" in str(e.value)
    assert scrub("at http://u:p@host:5000/x and u:p@host", "http://u:p@host:5000") == "at http://***@host:5000/x and ***@host"
    with pytest.raises(RuntimeError, match="no credentials here"):  # nothing secret: the error as it was
        with storage.errors("s3://bucket/x"):
            raise RuntimeError("no credentials here")


def test_every_experiment_is_tagged_for_the_model_training_view(tmp_path):
    from mlflow.tracking import MlflowClient

    from rgnn.tracking.runs import EXPERIMENT_KIND, experiment_id, start_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    start_run(uri, "new", "r", {}, {})
    old = client.create_experiment("made-elsewhere")  # e.g. by an earlier version: tagged when reused
    assert experiment_id(client, "made-elsewhere", uri) == old
    for name in ("new", "made-elsewhere"):
        tags = client.get_experiment_by_name(name).tags
        assert tags["mlflow.experimentKind"] == EXPERIMENT_KIND["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.parametrize("setting,value", [("lr", "1e-3"), ("batch_size", 2.5), ("smoke_test", "no"),
                                           ("epochs", [1, 1, "x", 1]), ("flip", 1), ("stage_lr", {"joint": "fast"}),
                                           ("mean", [0.5, "a", 0.5]), ("max_regions", True)])
def test_config_files_with_wrong_types_are_refused_naming_the_setting(setting, value, tmp_path):
    """A settings file (or the config.json beside a checkpoint) is read by type, never coerced."""
    from rgnn.train.config import parse_args

    path = tmp_path / "c.json"
    path.write_text(json.dumps({setting: value}))
    with pytest.raises(ValueError, match=f"setting {setting}="):
        parse_args(["--config", str(path)])


def test_class_names_mlflow_refuses_as_keys_still_get_their_ap_logged(tmp_path):
    from mlflow.tracking import MlflowClient

    from rgnn.tracking.runs import RunLogger, class_metric, start_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = start_run(uri, "keys", "r", {}, {})
    log = RunLogger(uri, run_id)
    names = ["bad:name?*", "water animal", "a/b", "ok"]
    log.class_aps(names, [0.5, 0.25, float("nan"), 1.0])
    log.flush()
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert metrics == {"val/AP/bad_name__": 0.5, "val/AP/water animal": 0.25, "val/AP/ok": 1.0}
    assert class_metric("bad:name?*") == "val/AP/bad_name__"


def test_the_photo_recipe_comes_with_the_backbone_on_any_data():
    """--photos and a plain --coco-root DIR --backbone efficientnet_lite0 take the same recipe, whose input
    normalisation is the weights' own (mean = std = 0.5)."""
    photos, _ = parse_args(["--photos"])
    coco, _ = parse_args(["--coco-root", "/data/photos", "--backbone", "efficientnet_lite0"])
    for cfg in (photos, coco):
        assert (cfg.model.backbone, cfg.model.weights, cfg.model.mean, cfg.model.std) == \
            ("efficientnet_lite0", "imagenet", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        assert (cfg.schedule.epochs, cfg.schedule.lr, cfg.schedule.batch_size, cfg.input.image_size,
                cfg.input.max_regions) == ([4, 4, 2, 6], 8e-4, 8, 288, 64)
        # the gate: one hidden layer on the standardised pooled trunk feature (README: Photographs)
        assert (cfg.model.gate_input, cfg.model.gate_hidden, cfg.model.gate_norm, cfg.schedule.gate_loss,
                cfg.model.whole_image_gate, cfg.model.pool_layer) == ("roi", 256, "batch", "localization", "open", "fc8")
    assert photos.dataset == "photos" and (photos.data.photos, photos.data.synthetic_train) == ("main", 600)
    assert parse_args(["--photos", "alt"])[0].data.photos == "alt"
    vgg, _ = parse_args(["--coco-root", "/data/coco"])
    assert vgg.model.mean == (0.485, 0.456, 0.406) and vgg.schedule.epochs == [10, 10, 10, 20]
    for paper in (vgg, parse_args([])[0]):  # the paper's gate (one FC layer on raw fc7) and pooled layer
        assert (paper.model.gate_input, paper.model.gate_hidden, paper.model.gate_norm, paper.schedule.gate_loss,
                paper.model.whole_image_gate, paper.model.pool_layer) == ("fc7", 0, "none", "multitask", "learned",
                                                                          "softmax")
    own, _ = parse_args(["--photos", "--gate-norm", "none", "--gate-input", "fc7", "--gate-hidden", "0", "--gate-loss",
                         "multitask", "--whole-image-gate", "learned", "--pool-layer", "softmax"])
    assert (own.model.gate_input, own.model.gate_hidden, own.model.gate_norm, own.schedule.gate_loss,
            own.model.whole_image_gate, own.model.pool_layer) == ("fc7", 0, "none", "multitask", "learned", "softmax")
    smoke, _ = parse_args(["--photos", "--smoke-test"])
    assert (smoke.model.backbone, smoke.model.weights, smoke.data.synthetic_train) == ("efficientnet_lite0", "imagenet", 48)
    with pytest.raises(ValueError, match="at most one"):
        parse_args(["--photos", "--coco-root", "/x"])
