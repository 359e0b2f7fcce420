"""Train the paper's CIFAR ResNet with fused blocks, beside eager PyTorch, on offline synthetic data.

    python examples/train_cifar.py                      # resnet-20, fused vs eager, 30 SGD steps
    python examples/train_cifar.py --plain              # also the plain-20 twin (the degradation experiment)
    python examples/train_cifar.py --depth 56 --steps 200 --batch 128 --size 32   # on a GPU

SGD as in the paper (momentum 0.9, weight decay 1e-4). Fused and eager start from the same weights and
see the same batches, so their loss curves should lie on top of each other. On a CPU the fused kernels
run in the Triton interpreter (slow: keep the defaults small).
"""
import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=20, help="6n+2: 20, 32, 44, 56, 110")
    p.add_argument("--shortcut", default="A", choices=["A", "B", "C"])
    p.add_argument("--plain", action="store_true", help="also train the plain (no-shortcut) twins")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=16, help="image side (CIFAR is 32)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--plot", default="", help="write the loss curves to this PNG (needs matplotlib)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1" and "fusedres" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # must be set before fusedres (triton.jit) is imported
    import fusedres
    from fusedres.data import batches, synthetic_cifar

    images, labels = synthetic_cifar(max(512, 4 * args.batch), size=args.size)
    variants = [("resnet", False)] + ([("plain", True)] if args.plain else [])
    curves = {}
    for kind, plain in variants:
        torch.manual_seed(0)
        fused = fusedres.cifar_resnet(args.depth, args.shortcut, plain=plain)
        eager = fusedres.cifar_resnet(args.depth, args.shortcut, plain=plain, fused=False)
        eager.load_state_dict(fused.state_dict())
        for name, model in (("fused", fused), ("eager", eager)):
            model.to(device).to(memory_format=torch.channels_last).train()
            opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
            data = batches(images, labels, args.batch, seed=1)
            losses, start = [], time.time()
            for _ in range(args.steps):
                x, y = next(data)
                x = x.to(device).to(memory_format=torch.channels_last)
                loss = torch.nn.functional.cross_entropy(model(x), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            curves[f"{kind}-{args.depth} {name}"] = (losses, time.time() - start)

    names = list(curves)
    print(f"cifar {args.depth}-layer, shortcut {args.shortcut}, batch {args.batch}, {args.size}x{args.size}, "
          f"device {device}")
    print("step  " + "  ".join(f"{n:>18}" for n in names))
    for step in range(args.steps):
        print(f"{step + 1:4d}  " + "  ".join(f"{curves[n][0][step]:18.5f}" for n in names))
    print("time  " + "  ".join(f"{curves[n][1]:17.1f}s" for n in names))
    for kind, _ in variants:
        f, e = curves[f"{kind}-{args.depth} fused"][0], curves[f"{kind}-{args.depth} eager"][0]
        print(f"{kind}: largest |fused - eager| loss gap over {args.steps} steps: "
              f"{max(abs(a - b) for a, b in zip(f, e)):.2e}")
    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot written")
            return 0
        for n in names:
            plt.plot(range(1, args.steps + 1), curves[n][0], label=n, linestyle="--" if "eager" in n else "-")
        plt.xlabel("SGD step")
        plt.ylabel("training loss")
        plt.legend()
        plt.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
