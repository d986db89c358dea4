"""Record what the released SAM-Med3D checkpoints hold, from the official code itself, as a small JSON manifest.

    python benchmarks/official_checkpoint_manifest.py /path/to/SAM-Med3D \
        [--out tests/fixtures/official_checkpoint_manifest.json]

``/path/to/SAM-Med3D`` is a checkout of github.com/uni-medical/SAM-Med3D. The script imports its model
registry (``segment_anything.build_sam3D.sam_model_registry3D``) and builds ``vit_b_ori`` (the architecture
of ``sam_med3d.pth`` and ``sam_med3d_turbo.pth``) to list every ``state_dict`` entry (name, shape, dtype), and
reads its ``train.py`` (without running it) for the container its ``save_checkpoint`` writes: the keys of the
dict passed to ``torch.save`` with the expression each is saved from, the optimizer's parameter groups, and
the command-line options that become the saved ``args`` (an ``argparse.Namespace``). Nothing of the
official source is copied; ``tests/test_checkpoint.py`` checks our model and loader against the manifest.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import torch


def _save_call(tree: ast.Module) -> ast.Dict:
    """The dict literal passed to ``torch.save`` inside ``save_checkpoint``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "save_checkpoint":
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and ast.unparse(call.func) == "torch.save" \
                        and isinstance(call.args[0], ast.Dict):
                    return call.args[0]
    raise SystemExit("train.py has no save_checkpoint calling torch.save({...}, ...)")


def _optimizer_groups(tree: ast.Module) -> list:
    """The parameter groups of the optimizer built in ``set_optimizer``: (module, lr expression or None)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "set_optimizer":
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and ast.unparse(call.func).startswith("torch.optim."):
                    groups = []
                    for group in call.args[0].elts:
                        entry = {ast.literal_eval(k): ast.unparse(v) for k, v in zip(group.keys, group.values)}
                        groups.append({"params": entry["params"], "lr": entry.get("lr")})
                    return [{"optimizer": ast.unparse(call.func), "groups": groups}]
    raise SystemExit("train.py has no set_optimizer building a torch.optim optimizer")


def _options(tree: ast.Module) -> dict:
    """``{option: default}`` of every ``parser.add_argument`` (the attributes of the saved ``args``)."""
    options = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("add_argument"):
            name = ast.literal_eval(node.args[0]).lstrip("-").replace("-", "_")
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            try:
                options[name] = None if default is None else ast.literal_eval(default)
            except ValueError:
                options[name] = ast.unparse(default)
    return options


def build_manifest(official: Path) -> dict:
    sys.path.insert(0, str(official))
    from segment_anything.build_sam3D import sam_model_registry3D  # the official registry

    torch.manual_seed(0)
    model = sam_model_registry3D["vit_b_ori"](checkpoint=None)
    state = model.state_dict()
    entries = [{"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", "")}
               for name, tensor in state.items()]
    train = ast.parse((official / "train.py").read_text())
    save = _save_call(train)
    commit = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], capture_output=True, text=True)
    return {
        "source": "github.com/uni-medical/SAM-Med3D",
        "commit": commit.stdout.strip() or None,
        "model": "vit_b_ori: sam_model_registry3D['vit_b_ori'] (segment_anything/build_sam3D.py)",
        "released_files": ["sam_med3d.pth", "sam_med3d_turbo.pth"],
        "container": {
            "written_by": "train.py save_checkpoint: torch.save({...}, 'sam_model_<describe>.pth')",
            "fields": {ast.literal_eval(k): ast.unparse(v) for k, v in zip(save.keys, save.values)},
            "optimizer": _optimizer_groups(train)[0],
            "args_options": _options(train),
        },
        "num_entries": len(entries),
        "total_elements": int(sum(t.numel() for t in state.values())),
        "entries": entries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("official", type=Path, help="checkout of github.com/uni-medical/SAM-Med3D")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "tests/fixtures/official_checkpoint_manifest.json")
    args = parser.parse_args()
    if not (args.official / "segment_anything" / "build_sam3D.py").is_file():
        parser.error(f"{args.official} is not a SAM-Med3D checkout (no segment_anything/build_sam3D.py)")
    manifest = build_manifest(args.official.resolve())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{args.out}: {manifest['num_entries']} state_dict entries, {manifest['total_elements']} elements, "
          f"container fields {list(manifest['container']['fields'])}")


if __name__ == "__main__":
    main()
