"""checkpoint: ``.npz`` files of plain arrays + JSON that round-trip model, optimiser and schedule
exactly, fail loudly on the wrong file or the wrong model, survive a crash (and a SIGKILL) in
the middle of a save, and average for §6.1."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import minitransformer as mt
from minitransformer import backend, checkpoint
from minitransformer.checkpoint import (atomic_write, average_checkpoints, checkpoint_config, checkpoint_info,
                                        load_checkpoint, read_checkpoint, save_checkpoint)
from minitransformer.data import collate
from minitransformer.nn import Transformer
from minitransformer.optim import Adam, NoamSchedule
from minitransformer.train import train_step

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=24, d_model=16, num_heads=2, num_layers=2, d_ff=32, dropout=0.0, max_len=32)


def trained(device="cpu", steps=3, **config):
    """A small model, its Adam and Noam schedule after a few updates (so m, v and lr are not zero)."""
    model = Transformer(**{**SMALL, **config}).to(device)
    optimizer = Adam(model.parameters(), lr=0.0)
    schedule = NoamSchedule(optimizer, model.d_model, warmup_steps=10)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        seqs = [rng.integers(4, model.vocab_size, size=rng.integers(2, 7)).tolist() for _ in range(4)]
        train_step(model, optimizer, schedule, collate(seqs, seqs))
    return model, optimizer, schedule


def host(array):
    return backend.to_numpy(array)


def assert_same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


# ---- round trip -------------------------------------------------------------------------------

def test_round_trip_model_optimizer_schedule_and_meta(device, tmp_path):
    model, optimizer, schedule = trained(device)
    meta = {"step": 3, "epoch": 1, "note": "ü", "nested": {"losses": [[1, 2.5], [2, 2.25]]}}
    path = save_checkpoint(tmp_path / "sub" / "ckpt.npz", model, optimizer, schedule, meta)
    assert path == tmp_path / "sub" / "ckpt.npz" and path.is_file()

    mt.manual_seed(12345)   # a differently initialised model to load into
    model2 = Transformer(**SMALL).to(device)
    optimizer2 = Adam(model2.parameters(), lr=0.0)
    schedule2 = NoamSchedule(optimizer2, model2.d_model, warmup_steps=10)
    assert not np.array_equal(host(model2.parameters()[0].data), host(model.parameters()[0].data))

    assert load_checkpoint(path, model2, optimizer2, schedule2) == meta
    assert_same_params(model, model2)
    assert model2.device == device
    assert optimizer2.step_count == optimizer.step_count == 3
    assert optimizer2.lr == optimizer.lr > 0
    assert schedule2.step_count == schedule.step_count == 3
    for m, m2, v, v2 in zip(optimizer.m, optimizer2.m, optimizer.v, optimizer2.v):
        assert backend.device_of(m2) == device
        np.testing.assert_array_equal(host(m), host(m2))
        np.testing.assert_array_equal(host(v), host(v2))
    assert any(np.abs(host(m)).max() > 0 for m in optimizer2.m)

    # both copies now take the same next step
    seqs = [[5, 6, 7], [8, 9]]
    train_step(model, optimizer, schedule, collate(seqs, seqs))
    train_step(model2, optimizer2, schedule2, collate(seqs, seqs))
    assert_same_params(model, model2)


def test_file_is_plain_arrays_and_json(tmp_path):
    model, optimizer, schedule = trained()
    path = save_checkpoint(tmp_path / "c.npz", model, optimizer, schedule, {"step": 3})
    with np.load(path, allow_pickle=False) as npz:     # nothing pickled
        files = set(npz.files)
        info = json.loads(str(npz["__meta__"]))
        for name, array in model.state_dict().items():
            np.testing.assert_array_equal(npz[f"model.{name}"], array)
        assert npz["optimizer.m.0"].shape == model.parameters()[0].shape
    assert files == ({"__meta__"} | {f"model.{n}" for n in model.state_dict()}
                     | {f"optimizer.{b}.{i}" for b in "mv" for i in range(len(optimizer.params))})
    assert info["meta"] == {"step": 3}
    assert info["optimizer"] == {"type": "Adam", "step_count": 3, "lr": optimizer.lr}
    assert info["schedule"] == {"step_count": 3}
    assert checkpoint_config(path) == model.config.__dict__
    assert checkpoint_info(path) == info            # the same JSON, read without the arrays
    rebuilt = Transformer.from_config(checkpoint_config(path))
    load_checkpoint(path, rebuilt)
    assert_same_params(model, rebuilt)


def test_model_only_checkpoint(tmp_path):
    model, _, _ = trained()
    path = save_checkpoint(tmp_path / "m.npz", model)
    arrays, info = read_checkpoint(path)
    assert not any(k.startswith("optimizer.") for k in arrays) and "optimizer" not in info
    fresh = Transformer(**SMALL)
    assert load_checkpoint(path, fresh) == {}
    assert_same_params(model, fresh)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(path, fresh, Adam(fresh.parameters()))


def test_device_neutral_saved_on_device_loaded_on_cpu(device, tmp_path):
    """Arrays are stored from the host: a GPU checkpoint loads on a CPU-only model (and back)."""
    model, optimizer, schedule = trained(device)
    path = save_checkpoint(tmp_path / "c.npz", model, optimizer, schedule)
    arrays, _ = read_checkpoint(path)
    assert all(type(a) is np.ndarray for a in arrays.values())
    cpu_model = Transformer(**SMALL)
    cpu_optimizer = Adam(cpu_model.parameters())
    load_checkpoint(path, cpu_model, cpu_optimizer)
    assert cpu_model.device == "cpu" and all(backend.device_of(m) == "cpu" for m in cpu_optimizer.m)
    assert_same_params(model, cpu_model)
    back = Transformer(**SMALL).to(device)
    load_checkpoint(save_checkpoint(tmp_path / "cpu.npz", cpu_model), back)
    assert back.device == device
    assert_same_params(model, back)


# ---- loading the wrong thing ----------------------------------------------------------------------

def test_strict_load_names_missing_and_unexpected_keys(tmp_path):
    two = Transformer(**SMALL)
    one = Transformer(**{**SMALL, "num_layers": 1})
    two_path, one_path = save_checkpoint(tmp_path / "two.npz", two), save_checkpoint(tmp_path / "one.npz", one)
    with pytest.raises(KeyError, match=r"unexpected keys \[.*encoder\.layers\.1\."):
        load_checkpoint(two_path, Transformer(**{**SMALL, "num_layers": 1}))
    with pytest.raises(KeyError, match=r"missing keys \[.*decoder\.layers\.1\."):
        load_checkpoint(one_path, Transformer(**SMALL))
    # non-strict: the shared parameters load, the others keep their initialisation
    target = Transformer(**SMALL)
    before = target.state_dict()
    load_checkpoint(one_path, target, strict=False)
    after, saved = target.state_dict(), one.state_dict()
    assert "encoder.layers.1.feed_forward.linear1.weight" in after
    for k in after:
        np.testing.assert_array_equal(after[k], saved[k] if k in saved else before[k], err_msg=k)


@pytest.mark.parametrize("strict", [True, False])
def test_wrong_shape_is_an_error_naming_the_parameter(tmp_path, strict):
    path = save_checkpoint(tmp_path / "c.npz", Transformer(**SMALL))
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.feed_forward\.linear1\.weight has shape "
                                         r"\(32, 16\).*expected \(48, 16\)"):
        load_checkpoint(path, Transformer(**{**SMALL, "d_ff": 48}), strict=strict)


def test_optimizer_for_other_parameters_is_rejected(tmp_path):
    model, optimizer, _ = trained()
    path = save_checkpoint(tmp_path / "c.npz", model, optimizer)
    other = Transformer(**{**SMALL, "num_layers": 1})
    before, adam = other.state_dict(), Adam(other.parameters(), lr=0.5)
    with pytest.raises(ValueError, match=r"Adam\.load_state_dict: m\.\d+ has shape"):
        load_checkpoint(path, other, adam, strict=False)
    assert_state_equal(before, other)        # refused before the shared parameters were copied
    assert adam.lr == 0.5 and adam.step_count == 0


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_checkpoint(tmp_path / "nope.npz", Transformer(**SMALL))
    with pytest.raises(FileNotFoundError):
        average_checkpoints([tmp_path / "nope.npz"])
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        checkpoint_info(tmp_path / "nope.npz")


@pytest.mark.parametrize("damage", ["empty", "truncated_header", "half", "last_bytes", "garbage", "corrupt",
                                    "plain_npz", "bad_json", "array_header"])
def test_damaged_file_is_a_value_error_naming_the_path(tmp_path, damage):
    # an array big enough that NumPy parses its header before the zip's CRC check reads it all
    good = save_checkpoint(tmp_path / "good.npz", Transformer(**{**SMALL, "vocab_size": 2000}))
    data = good.read_bytes()
    bad = tmp_path / f"bad-{damage}.npz"
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated_header":
        bad.write_bytes(data[:20])
    elif damage == "half":
        bad.write_bytes(data[:len(data) // 2])
    elif damage == "last_bytes":
        bad.write_bytes(data[:-7])
    elif damage == "garbage":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "corrupt":   # right length, zeroed bytes in the middle of an array
        corrupt = bytearray(data)
        corrupt[len(data) // 2:len(data) // 2 + 64] = bytes(64)
        bad.write_bytes(bytes(corrupt))
    elif damage == "plain_npz":  # an npz, but not one of ours
        np.savez(bad, a=np.arange(3))
    elif damage == "array_header":   # zeroed bytes inside an array's header: NumPy's parser raised TokenError
        damaged, start = bytearray(data), data.index(b"{'descr'")
        damaged[start + 30:start + 70] = bytes(40)
        bad.write_bytes(bytes(damaged))
    elif damage == "bad_json":
        arrays = dict(np.load(good, allow_pickle=False))
        arrays["__meta__"] = np.array("{not json")
        np.savez(bad, **arrays)
    with pytest.raises(ValueError, match=str(bad.name)):
        load_checkpoint(bad, Transformer(**SMALL))
    if damage not in ("corrupt", "array_header"):     # (a damaged array: the JSON alone still reads)
        with pytest.raises(ValueError, match=str(bad.name)):
            checkpoint_info(bad)


# ---- atomic saves ------------------------------------------------------------------------------

def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    model, optimizer, schedule = trained(steps=1)
    path = save_checkpoint(tmp_path / "c.npz", model, optimizer, schedule, {"version": 1})
    before = path.read_bytes()

    def savez_then_fail(f, **arrays):
        f.write(b"PK\x03\x04 half a zip file")   # some bytes reach the temporary file first
        raise error
    monkeypatch.setattr(checkpoint.np, "savez", savez_then_fail)
    with pytest.raises(type(error)):
        save_checkpoint(path, model, optimizer, schedule, {"version": 2})
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert load_checkpoint(path, Transformer(**SMALL)) == {"version": 1}
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]


def test_atomic_write_replaces_whole_and_cleans_up(tmp_path):
    path = tmp_path / "deep" / "er" / "f.bin"
    atomic_write(path, lambda f: f.write(b"one"))
    assert path.read_bytes() == b"one"
    atomic_write(path, lambda f: f.write(b"two, longer"))
    assert path.read_bytes() == b"two, longer"
    with pytest.raises(ZeroDivisionError):
        atomic_write(path, lambda f: (f.write(b"three"), 1 / 0))
    assert path.read_bytes() == b"two, longer" and leftovers(path.parent) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_written_files_get_the_mode_open_would_give(tmp_path):
    """mkstemp makes its file private (0600): a run folder's checkpoints, JSON and tokenizer were
    unreadable to anyone else while its plots were not. They follow the umask, as open() does."""
    previous = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "f.bin", lambda f: f.write(b"x"))
        plain = tmp_path / "plain.bin"
        plain.write_bytes(b"x")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o640


KILL_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import minitransformer as mt
    from minitransformer.checkpoint import save_checkpoint
    from minitransformer.nn import Transformer

    path, version = sys.argv[1], int(sys.argv[2])
    mt.manual_seed(0)
    model = Transformer(**{config!r})
    base = model.state_dict()
    while True:   # version k: every parameter is base + k, and meta says k
        for name, p in model.named_parameters():
            p.data = base[name] + np.float32(version)
        save_checkpoint(path, model, meta={{"version": version}})
        print(version, flush=True)
        version += 1
""")
BIG = dict(vocab_size=8000, d_model=256, num_heads=4, num_layers=2, d_ff=1024, dropout=0.0, max_len=64)


def test_sigkill_during_repeated_saves_never_leaves_a_broken_checkpoint(tmp_path):
    """A process saving a ~23 MB checkpoint in a loop is SIGKILLed at random moments; each time,
    the file on disk is exactly one of the versions it completed."""
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT.format(config=BIG))
    path = tmp_path / "ckpt" / "model.npz"
    mt.manual_seed(0)
    base = Transformer(**BIG).state_dict()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OPENBLAS_NUM_THREADS": "1"}
    rng = np.random.default_rng()
    version, killed_mid_save = 0, 0
    for _ in range(5):
        stale = set(leftovers(path.parent)) if path.parent.exists() else set()   # from earlier kills
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(version)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()     # one save completed: the loop is running
            assert first.strip() == str(version), proc.stderr.read()
            time.sleep(rng.uniform(0.0, 0.25))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        completed = [int(v) for v in (first + proc.stdout.read()).split()]
        killed_mid_save += bool(set(leftovers(path.parent)) - stale)   # its temporary file is still there

        arrays, info = read_checkpoint(path)    # must load: never a half-written file
        saved = info["meta"]["version"]
        assert completed[0] <= saved <= completed[-1] + 1   # the last may finish after its print was lost
        for name, array in base.items():
            np.testing.assert_array_equal(arrays[f"model.{name}"], array + np.float32(saved), err_msg=name)
        version = completed[-1] + 100           # the next process writes versions not seen before
    assert killed_mid_save >= 1, "no kill landed during a save: the test did not test anything"


# ---- averaging (§6.1) ----------------------------------------------------------------------------

def test_average_checkpoints_is_the_elementwise_mean(tmp_path):
    paths, states = [], []
    for seed in range(3):
        mt.manual_seed(seed)
        model = Transformer(**SMALL)
        states.append(model.state_dict())
        paths.append(save_checkpoint(tmp_path / f"c{seed}.npz", model, Adam(model.parameters())))
    average = average_checkpoints(paths)
    assert list(average) == list(states[0])
    for name in average:
        expected = np.mean([s[name].astype(np.float64) for s in states], axis=0)
        assert average[name].dtype == states[0][name].dtype
        np.testing.assert_allclose(average[name], expected, rtol=1e-6, atol=1e-7, err_msg=name)
        assert not np.array_equal(average[name], states[0][name]) or np.all(states[0][name] == states[1][name])
    model = Transformer(**SMALL)
    model.load_state_dict(average)
    one = average_checkpoints(paths[:1])
    for name in one:
        np.testing.assert_array_equal(one[name], states[0][name])
    twice = average_checkpoints([paths[0], paths[0], paths[1], paths[1]])
    pair = average_checkpoints(paths[:2])
    for name in pair:
        np.testing.assert_allclose(twice[name], pair[name], rtol=1e-6, atol=1e-7)


def test_average_checkpoints_rejects_mismatched_checkpoints(tmp_path):
    a = save_checkpoint(tmp_path / "a.npz", Transformer(**SMALL))
    fewer_layers = save_checkpoint(tmp_path / "b.npz", Transformer(**{**SMALL, "num_layers": 1}))
    wider = save_checkpoint(tmp_path / "c.npz", Transformer(**{**SMALL, "d_ff": 48}))
    with pytest.raises(ValueError, match="different parameters"):
        average_checkpoints([a, fewer_layers])
    with pytest.raises(ValueError, match=r"linear1\.weight has shape \(48, 16\) in .*c\.npz, \(32, 16\) in .*a\.npz"):
        average_checkpoints([a, wider])
    with pytest.raises(ValueError, match="no checkpoint"):
        average_checkpoints([])
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="g.npz"):
        average_checkpoints([a, garbage])



# ---- the wrong model configuration, optimiser or file; what meta may hold -------------------------

def assert_state_equal(state, model):
    now = model.state_dict()
    assert list(now) == list(state)
    for k in now:
        np.testing.assert_array_equal(now[k], state[k], err_msg=k)


@pytest.mark.parametrize("other", [dict(num_heads=4), dict(pad_id=1), dict(max_len=64),
                                   dict(num_heads=4, pad_id=3, max_len=16)])
def test_config_that_changes_the_function_is_rejected_naming_each_key(tmp_path, other):
    """The same parameter shapes, another function (the heads split d_model otherwise, other padding,
    another positional table): a ValueError naming each key, stored vs model value; nothing copied."""
    saved = Transformer(**SMALL)
    path = save_checkpoint(tmp_path / "c.npz", saved)
    model = Transformer(**{**SMALL, **other})
    before = model.state_dict()
    with pytest.raises(ValueError, match=r"c\.npz was saved from a model with another configuration") as error:
        load_checkpoint(path, model)
    message = str(error.value)
    for key, value in other.items():
        assert f"{key}: {saved.config.__dict__[key]!r} in the checkpoint, {value!r} in the model" in message
    assert "dropout" not in message and "num_layers" not in message and "from_config" in message
    assert_state_equal(before, model)
    load_checkpoint(path, model, strict=False)     # strict=False: load the parameters that fit
    assert_state_equal(saved.state_dict(), model)


@pytest.mark.parametrize("other, missing", [(dict(norm_first=True), r"encoder\.norm\.weight"),
                                            (dict(learned_positions=True), r"positional_encoding\."),
                                            (dict(share_embeddings=False), r"tgt_embedding\.weight")])
def test_config_that_changes_the_parameters_names_the_keys_and_the_config(tmp_path, other, missing):
    path = save_checkpoint(tmp_path / "c.npz", Transformer(**SMALL))
    key, value = next(iter(other.items()))
    with pytest.raises(KeyError, match=rf"missing keys \[.*{missing}.*the checkpoint's configuration differs: "
                                       rf"{key}: {not value!r} in the checkpoint, {value!r} in the model"):
        load_checkpoint(path, Transformer(**{**SMALL, **other}))


def test_config_differing_only_in_dropout_loads(tmp_path):
    """Dropout changes training, not the trained function: evaluate or resume with another P_drop."""
    saved = Transformer(**{**SMALL, "dropout": 0.3})
    path = save_checkpoint(tmp_path / "c.npz", saved)
    for dropout in (0.0, 0.1):
        model = Transformer(**{**SMALL, "dropout": dropout})
        assert load_checkpoint(path, model) == {}
        assert_same_params(saved, model)


def test_config_check_is_skipped_without_a_config_on_either_side(tmp_path):
    path = save_checkpoint(tmp_path / "c.npz", Transformer(**SMALL))
    arrays = dict(np.load(path, allow_pickle=False))
    info = json.loads(str(arrays["__meta__"]))
    info["config"] = None
    arrays["__meta__"] = np.array(json.dumps(info))
    bare = tmp_path / "no-config.npz"
    np.savez(bare, **arrays)
    load_checkpoint(bare, Transformer(**{**SMALL, "num_heads": 4}))     # a checkpoint without a config
    plain = Transformer(**{**SMALL, "num_heads": 4})
    plain.config = None                                                # a model without one
    load_checkpoint(path, plain)
    assert_state_equal({k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}, plain)


def test_optimizer_of_another_type_is_rejected_naming_both(tmp_path):
    from minitransformer.optim import SGD
    model, optimizer, schedule = trained()
    path = save_checkpoint(tmp_path / "c.npz", model, optimizer, schedule)
    fresh = Transformer(**SMALL)
    before = fresh.state_dict()
    sgd = SGD(fresh.parameters(), lr=0.5)
    with pytest.raises(ValueError, match=r"c\.npz holds the state of an optimizer of type Adam, "
                                         r"but the optimizer given is a SGD"):
        load_checkpoint(path, fresh, sgd)
    assert sgd.lr == 0.5 and sgd.step_count == 0
    assert_state_equal(before, fresh)


def test_npy_and_text_files_are_not_npz_archives(tmp_path):
    array, text = tmp_path / "arr.npy", tmp_path / "config.json"
    np.save(array, np.arange(3))
    text.write_text(json.dumps({"vocab_size": 24}))
    for read in (lambda p: load_checkpoint(p, Transformer(**SMALL)), checkpoint_info, read_checkpoint,
                 lambda p: average_checkpoints([p])):
        with pytest.raises(ValueError, match=r"arr\.npy is not a minitransformer checkpoint \(an \.npy array, "
                                             r"not an \.npz archive\)"):
            read(array)
        with pytest.raises(ValueError, match=r"config\.json is not a minitransformer checkpoint "
                                             r"\(not an \.npz archive"):
            read(text)


@pytest.mark.parametrize("paths", ["runs/a/last.npz", Path("runs/a/last.npz"), b"last.npz"])
def test_average_checkpoints_takes_a_list_not_one_path(paths):
    with pytest.raises(TypeError, match="average_checkpoints takes a list of checkpoint paths"):
        average_checkpoints(paths)
    with pytest.raises(ValueError, match="no checkpoint paths given"):
        average_checkpoints(iter([]))


def test_numpy_scalars_in_meta_are_saved_as_python_numbers(tmp_path):
    model, optimizer, schedule = trained(steps=1)
    meta = {"step": np.int64(3), "loss": np.float32(0.25), "done": np.bool_(True), "lr": np.array(0.5),
            "nested": {"steps": [np.int32(1), 2], "pair": (np.float64(2.5), np.uint8(7))}, "name": np.str_("x")}
    path = save_checkpoint(tmp_path / "c.npz", model, optimizer, schedule, meta)
    loaded = load_checkpoint(path, Transformer(**SMALL))
    assert loaded == {"step": 3, "loss": 0.25, "done": True, "lr": 0.5,
                      "nested": {"steps": [1, 2], "pair": [2.5, 7]}, "name": "x"}
    assert type(loaded["step"]) is int and type(loaded["done"]) is bool and type(loaded["lr"]) is float


@pytest.mark.parametrize("bad, where", [({"step": 1, "weights": np.arange(3)}, r"meta\['weights'\] is of type ndarray"),
                                        ({"history": [{"when": object()}]}, r"meta\['history'\]\[0\]\['when'\]"),
                                        ({(1, 2): "tuple key"}, r"meta has the key \(1, 2\) of type tuple")])
def test_unstorable_meta_is_a_type_error_naming_the_key_and_writes_nothing(tmp_path, bad, where):
    model = Transformer(**SMALL)
    path = save_checkpoint(tmp_path / "c.npz", model, meta={"version": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError, match=rf"save_checkpoint: {where}"):
        save_checkpoint(path, model, meta=bad)
    with pytest.raises(TypeError, match=rf"save_checkpoint: {where}"):
        save_checkpoint(tmp_path / "new.npz", model, meta=bad)
    assert path.read_bytes() == before and load_checkpoint(path, model) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]     # no new file, no temporary one


def test_a_bad_schedule_state_changes_neither_model_nor_optimizer(tmp_path):
    """The schedule's state is checked before the optimiser loads, as the optimiser's is before the
    model's arrays are copied: a load that fails anywhere leaves all three as they were."""
    model, optimizer, schedule = trained()
    path = save_checkpoint(tmp_path / "c.npz", model, optimizer, schedule)
    arrays = dict(np.load(path, allow_pickle=False))
    info = json.loads(str(arrays["__meta__"]))
    info["schedule"] = {"step_count": -2}
    arrays["__meta__"] = np.array(json.dumps(info))
    bad = tmp_path / "bad-schedule.npz"
    np.savez(bad, **arrays)
    fresh = Transformer(**SMALL)
    before = fresh.state_dict()
    adam = Adam(fresh.parameters(), lr=0.5)
    noam = NoamSchedule(adam, fresh.d_model, warmup_steps=10)
    with pytest.raises(ValueError, match=r"NoamSchedule.load_state_dict: step_count must be an int >= 0, got -2"):
        load_checkpoint(bad, fresh, adam, noam)
    assert_state_equal(before, fresh)
    assert adam.step_count == 0 and adam.lr == 0.5 and noam.step_count == 0
    assert all(not m.any() for m in adam.m)
