"""Training on features streamed from the sharded map equals training on the whole split in memory,
bit for bit, packed or not, and a streamed run stopped mid-epoch resumes to the same adapter."""

import pytest
import torch

from captune.config import Config, LoraConfig
from captune.data.prepare import Example
from captune.demo import world
from captune.model.load import load_model
from captune.model.lora import attach_lora
from captune.ops.feature_map import ShardWriter
from captune.training import train
from captune.training.feed import Resident, Streamed, choose_residence


def _examples(n, seed):
    return [Example(it["image_id"], it["image"], it["captions"]) for it in world.make_items("catalog", n, seed=seed)]


def _cfg(residence, **train):
    cfg = Config()
    cfg.model.device = "cpu"
    cfg.lora.target_modules = "all-linear"
    cfg.eval.batch_size = 4  # several batches and shards of features
    for k, v in {**dict(batch_size=6, lr=3e-3, log_every=1, epochs=2), **train, "feature_residence": residence}.items():
        setattr(cfg.train, k, v)
    return cfg


class Interrupt(Exception):
    pass


def _run(cfg, train_ex, val_ex, lora=None, **inputs):
    loaded = load_model(cfg.model)
    torch.manual_seed(cfg.train.seed)
    model = attach_lora(loaded.model, lora or cfg.lora)
    said = []
    result = train(model, loaded.processor, train_ex, val_ex, cfg, log=said.append, **inputs)
    state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    return result, state, "\n".join(said)


def _losses(result):
    return [(h["step"], h["loss"]) for h in result.history if h["type"] in ("train", "validation")]


@pytest.mark.parametrize("pack", [True, False])
def test_streamed_features_train_the_same_adapter_as_resident_ones(pack):
    train_ex, val_ex = _examples(10, 1), _examples(2, 2)
    kw = dict(pack=pack, validate_every=2, select="loss")
    whole, whole_state, said_gpu = _run(_cfg("gpu", **kw), train_ex, val_ex)
    streamed, state, said = _run(_cfg("stream", **kw), train_ex, val_ex)
    assert "(streamed from disk)" in said and "(on the device)" in said_gpu
    assert _losses(streamed) == _losses(whole) and len(_losses(whole)) > 4
    assert state.keys() == whole_state.keys() and all(torch.equal(state[k], whole_state[k]) for k in state)


def test_streamed_validation_reads_its_features_from_the_map_and_scores_the_same():
    train_ex, val_ex = _examples(8, 7), _examples(7, 8)  # 7 validation images: batches of 4 and 3
    kw = dict(pack=True, validate_every=1, select="CIDEr")
    seen = {"gpu": [], "stream": []}

    def scorer(where):
        def score(caps, refs):
            seen[where].append((caps, refs))
            return float(len(set(caps)))  # any function of the captions: they must be the same

        return score

    whole, whole_state, _ = _run(_cfg("gpu", **kw), train_ex, val_ex, score_fn=scorer("gpu"))
    streamed, state, said = _run(_cfg("stream", **kw), train_ex, val_ex, score_fn=scorer("stream"))
    assert "8 train, 7 validation images (streamed from disk)" in said
    rows = [[(h["loss"], h["CIDEr"]) for h in r.history if h["type"] == "validation"] for r in (whole, streamed)]
    assert rows[0] == rows[1] and len(rows[0]) == 2
    assert seen["stream"] == seen["gpu"] and len(seen["gpu"][0][0]) == 7
    assert all(torch.equal(state[k], whole_state[k]) for k in state)


def _trainer(cfg, train_ex, val_ex):
    from captune.training.trainer import Trainer, TrainInputs

    loaded = load_model(cfg.model)
    model = attach_lora(loaded.model, cfg.lora)
    return Trainer(model, loaded.processor, cfg, TrainInputs(train_ex, val_ex), log=lambda _: None).setup()


def test_validation_features_follow_the_training_splits_and_are_not_computed_unused():
    from captune.ops.feature_map import DeviceRows

    train_ex, val_ex = _examples(4, 9), _examples(3, 10)
    streamed = _trainer(_cfg("stream", validate_every=1), train_ex, val_ex)
    assert isinstance(streamed.val_feats, DeviceRows) and streamed.train_rows.streamed
    whole = _trainer(_cfg("gpu", validate_every=1), train_ex, val_ex)
    assert torch.equal(whole.val_feats, streamed.val_feats[:]) and not whole.train_rows.streamed
    never = _trainer(_cfg("stream", validate_every=0), train_ex, val_ex)
    assert never.val_feats is None and not never.validator.has_data
    said = _run(_cfg("gpu", epochs=1, validate_every=0), train_ex, val_ex)[2]
    assert "4 train, no validation images (on the device)" in said


def test_device_rows_read_like_the_whole_tensor(tmp_path):
    from captune.ops.feature_map import DeviceRows, FeatureMap

    x = torch.randn(7, 2, 3)
    w = ShardWriter(tmp_path, 7, 3)  # three shards: reads cross them
    w.write_rows(0, x)
    w.finish()
    rows = DeviceRows(FeatureMap(tmp_path), "cpu")
    assert len(rows) == 7 and rows.size(0) == 7 and rows.shape == x.shape and rows.dtype == x.dtype
    assert torch.equal(rows[2:6], x[2:6]) and torch.equal(rows[[5, 0, 3]], x[[5, 0, 3]])
    assert torch.equal(rows[-1], x[-1]) and torch.equal(rows[4:], x[4:])


def test_streamed_vision_outputs_train_the_qformer_the_same():
    train_ex = _examples(6, 3)
    lora = LoraConfig(target_modules="qformer", dropout=0.0)
    whole, whole_state, _ = _run(_cfg("gpu", pack=False, epochs=1), train_ex, [], lora=lora)
    streamed, state, said = _run(_cfg("stream", pack=False, epochs=1), train_ex, [], lora=lora)
    assert "streamed from disk" in said
    assert _losses(streamed) == _losses(whole)
    assert all(torch.equal(state[k], whole_state[k]) for k in state)


def test_streamed_run_stopped_mid_epoch_resumes_to_the_uninterrupted_adapter(tmp_path):
    train_ex, val_ex = _examples(10, 5), _examples(2, 6)
    kw = dict(epochs=2, validate_every=2, select="loss")
    cfg = _cfg("stream", checkpoint_every=2, **kw)
    full, full_state, _ = _run(_cfg("gpu", **kw), train_ex, val_ex)

    def stop(step):
        if step == 3:  # mid-epoch 1, a step after the checkpoint at step 2
            raise Interrupt

    common = dict(checkpoint_dir=tmp_path / "ckpt", log_path=tmp_path / "train.jsonl")
    with pytest.raises(Interrupt):
        _run(cfg, train_ex, val_ex, on_step=stop, **common)
    assert [p.parent.name for p in (tmp_path / "ckpt").glob("step-*/state.json")] == ["step-00000002"]
    resumed, state, said = _run(cfg, train_ex, val_ex, **common)
    assert "resuming from step-00000002 (epoch 1" in said and resumed.steps == full.steps
    assert all(torch.equal(state[k], full_state[k]) for k in full_state)


def test_feed_fetches_planned_rows_and_reads_unplanned_ones(tmp_path):
    x = torch.randn(9, 2, 3)
    w = ShardWriter(tmp_path, 9, 4)
    w.write_rows(0, x)
    w.finish()
    from captune.ops.feature_map import FeatureMap

    feed = Streamed(FeatureMap(tmp_path), torch.device("cpu"), depth=1)
    feed.plan([[0, 5], [8, 1, 2], [3]])
    assert torch.equal(feed.take([0, 5]), x[[0, 5]])
    assert torch.equal(feed.take([8, 1, 2]), x[[8, 1, 2]])
    assert torch.equal(feed.take([4]), x[[4]])  # off the plan: read at once
    assert torch.equal(feed.take([7]), x[[7]])  # after the plan: read at once
    feed.plan([[1]] * 50)  # a long plan stopped early: the thread ends
    feed.take([1])
    feed.stop()
    assert not feed.ahead.running
    assert torch.equal(Resident(x, torch.device("cpu")).take([2, 2]), x[[2, 2]])


def test_residence_choice():
    cpu = torch.device("cpu")
    assert choose_residence("stream", 1, cpu) == "stream" and choose_residence("gpu", 1 << 40, cpu) == "gpu"
    assert choose_residence("auto", 1 << 20, cpu) == "gpu"
    assert choose_residence("auto", 1 << 30, cpu) == "stream"
