"""The PyTorch twin of a `minitransformer train` run: same model, data, batches, schedule and steps.

    minitransformer train --preset tiny --steps 600 --out runs/ours
    python benchmarks/train_translator_torch.py --run runs/ours --out runs/torch
    minitransformer evaluate --checkpoint runs/ours
    minitransformer evaluate --checkpoint runs/torch

It reads the run's config.json and tokenizer, rebuilds the same training split and the same
token-budget batches (same seed, same order), starts from the same initial weights (our model built
with the run's seed, copied into the twin), trains the twin for as many steps as the run took with
Adam + Noam + label smoothing, and writes the trained weights as a minitransformer run directory.
Both runs are then decoded and scored by the same code (beam search, sacreBLEU), so a BLEU
difference comes from training alone.
"""
import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished minitransformer run directory")
    parser.add_argument("--out", required=True, help="where to write the twin's run directory")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=0, help="default: as many as the run took")
    args = parser.parse_args()

    import torch
    from minitransformer import backend
    from minitransformer.checkpoint import read_checkpoint, save_checkpoint
    from minitransformer.cli import _encode, _read_config, _read_tokenizer, latest_checkpoint, run_splits
    from minitransformer.data import TokenBatcher
    from minitransformer.nn import Transformer
    from torch_twin import TorchTransformer, make_optimizer, train_step

    run, out = Path(args.run), Path(args.out)
    config, tokenizer = _read_config(run), _read_tokenizer(run)
    steps = args.steps or read_checkpoint(latest_checkpoint(run))[1]["meta"]["step"]
    data, preset, train = config["data"], config["preset_settings"], config["train"]
    ids = _encode(tokenizer, run_splits(data)["train"], data.get("max_len", 64))
    batcher = TokenBatcher(*ids, max_tokens=preset["max_tokens"], seed=config["seed"])

    backend.manual_seed(config["seed"])                       # the run's initial weights
    ours = Transformer.from_config(config["model"])
    torch.manual_seed(config["seed"])
    twin = TorchTransformer.from_ours(ours).to(args.device)
    optimizer = make_optimizer(twin, tuple(train["betas"]), train["adam_eps"])

    step, epoch, started = 0, 0, time.perf_counter()
    while step < steps:
        for batch in batcher.epoch(epoch):
            if step == steps:
                break
            step += 1
            loss = train_step(twin, optimizer, step, batch.src, batch.tgt_in, batch.tgt_out,
                              train["label_smoothing"], train["warmup_steps"], train["lr_factor"],
                              train["clip_norm"] or None)
            if step % 100 == 0 or step == steps:
                print(f"step {step}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - started:.0f} s",
                      flush=True)
        epoch += 1

    ours.load_state_dict({k: v.detach().cpu().numpy() for k, v in twin.named_parameters()})
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(run / name, out / name)
    save_checkpoint(out / "last.npz", ours, meta={"step": step, "trained_by": "torch twin"})
    print(f"trained the twin {step} steps in {time.perf_counter() - started:.0f} s; "
          f"score it with: minitransformer evaluate --checkpoint {out}")


if __name__ == "__main__":
    main()
