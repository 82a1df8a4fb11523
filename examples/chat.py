"""Terminal chat with an edgelm ONNX export, streaming the reply as it is generated.

Uses only edgelm.runtime (onnxruntime, tokenizers, numpy, jinja2), so it runs on a device
without torch. Type a message and press Enter; `/reset` clears the history, `/exit` or
end of input (Ctrl-D) quits.

    python examples/chat.py out/export-int8 --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import sys

from edgelm.runtime import Generator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", help="folder written by the ONNX export (contains edgelm_export.json)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="maximum tokens per reply (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 turns the filter off (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with this probability mass; 1.0 turns the filter off (default: 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: none, not reproducible)")
    parser.add_argument("--system", default=None, help="system message placed before the conversation (default: the template's own)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    parser.add_argument("--provider", action="append", default=None, help="execution provider name or alias such as cpu or cuda; repeat for a priority list (default: cpu)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    generator = Generator.from_pretrained(args.export_dir, providers=args.provider, intra_op_threads=args.threads)
    interactive = sys.stdin.isatty()
    history: list[dict] = []

    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            print()
            return 0
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            return 0
        if message == "/reset":
            history.clear()
            print("(history cleared)")
            continue

        history.append({"role": "user", "content": message})
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + history
        print("assistant> ", end="", flush=True)
        pieces = []
        for piece in generator.stream(
            messages,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        ):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(pieces)})


if __name__ == "__main__":
    sys.exit(main())
