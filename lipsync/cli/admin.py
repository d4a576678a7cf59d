"""`lipsync-admin`: API keys and development certificates (docs/SECURITY.md).

    lipsync-admin new-key --name NAME [--scopes client|admin|client,admin]
                          [--max-streams N] [--max-fps F] [--append KEYS_FILE]
    lipsync-admin hash-key            # reads a key on stdin, prints its SHA-256
    lipsync-admin dev-certs --out DIR [--name EXTRA_DNS_NAME ...]

`new-key` prints the key once (give it to the client; it is not stored anywhere) and the
entry to add to `auth.api_keys_file` (`--append` adds it there). The services re-read the
keys file when it changes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from lipsync.serving.api_keys import SCOPES, ApiKey, KeysFileError, hash_key, load_keys, new_key

PROG = "lipsync-admin"


def _scopes(text: str) -> list[str]:
    scopes = [s.strip() for s in text.split(",") if s.strip()]
    if not scopes or not set(scopes) <= set(SCOPES):
        raise argparse.ArgumentTypeError(f"scopes must be a comma list of {', '.join(SCOPES)}")
    return scopes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="API keys and development certificates.")
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("new-key", help="create an API key and print its keys-file entry")
    k.add_argument("--name", required=True, help="who the key is for (shown in logs)")
    k.add_argument("--scopes", type=_scopes, default=["client"], help="client (default), admin")
    k.add_argument("--max-streams", type=int, default=0, help="concurrent streams; 0: no limit")
    k.add_argument(
        "--max-fps", type=float, default=0.0, help="frames per second (token bucket); 0: no limit"
    )
    k.add_argument("--append", type=Path, help="append the entry to this keys file")
    sub.add_parser("hash-key", help="print the SHA-256 of a key read from stdin")
    c = sub.add_parser("dev-certs", help="write a development CA and certificates")
    c.add_argument("--out", required=True, type=Path, help="folder for the PEM files")
    c.add_argument(
        "--name", action="append", default=[], help="another DNS name for both server certs"
    )
    return p


def _new_key(args: argparse.Namespace) -> int:
    if args.max_streams < 0 or args.max_fps < 0:
        print(f"{PROG}: error: limits must be >= 0", file=sys.stderr)
        return 2
    key = new_key()
    entry = ApiKey(
        args.name, hash_key(key), frozenset(args.scopes), args.max_streams, args.max_fps
    ).entry()
    if args.max_fps == int(args.max_fps):
        entry["max_frames_per_second"] = int(args.max_fps)
    text = yaml.safe_dump([entry], sort_keys=False)
    if args.append:
        existing = load_keys(args.append) if args.append.exists() else {}
        if any(k.name == args.name for k in existing.values()):
            print(f"{PROG}: error: {args.append} has a key named {args.name!r}", file=sys.stderr)
            return 2
        with open(args.append, "a") as f:
            f.write(text)
        load_keys(args.append)  # still loads
    print(f"# API key {args.name!r} (shown once; the service stores only its SHA-256):")
    print(key)
    where = f"added to {args.append}" if args.append else "add to auth.api_keys_file"
    print(f"# keys-file entry ({where}):")
    print(text, end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "new-key":
            return _new_key(args)
        if args.command == "hash-key":
            key = sys.stdin.readline().strip()
            if not key:
                print(f"{PROG}: error: no key on stdin", file=sys.stderr)
                return 2
            print(hash_key(key))
            return 0
        from lipsync.local.devcerts import write_dev_certs

        paths = write_dev_certs(args.out, args.name)
    except (KeysFileError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"{PROG}: error: {exc} (pip install 'lipsync-serving[tools]')", file=sys.stderr)
        return 2
    for role, path in paths.items():
        print(f"{role:24s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
