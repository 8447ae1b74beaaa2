"""``ctrlnet models list | download NAME | path NAME``: the official weights and where they are."""

from __future__ import annotations

import argparse
import sys


def add_models_parser(sub) -> None:
    p = sub.add_parser(
        "models", help="list, download and locate official model files",
        description="The official Stable Diffusion bases, ControlNet 1.0/1.1 models and annotator weights. "
                    "`list` shows each with its size and whether it is on this machine; `download` fetches "
                    "from the Hugging Face hub (resumable; into its cache unless --local-dir); `path` prints "
                    "where a file is, without the network.",
        epilog="examples:\n"
               "  ctrlnet models list --kind controlnet\n"
               "  ctrlnet models download control_v11p_sd15_canny sd15\n"
               "  ctrlnet generate --base $(ctrlnet models path sd15) \\\n"
               "      --controlnet $(ctrlnet models path control_v11p_sd15_canny) --control in.png --annotator canny",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", action="append", default=[], metavar="FOLDER",
                        help="also look in this folder (repeatable; also $CTRLNET_MODELS_DIR)")
    common.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: the hub's)")
    lp = msub.add_parser("list", parents=[common], help="show the table")
    lp.add_argument("--kind", choices=["base", "controlnet", "annotator"], default=None)
    dp = msub.add_parser("download", parents=[common], help="fetch files from the hub")
    dp.add_argument("names", nargs="+", metavar="NAME")
    dp.add_argument("--local-dir", default=None, help="put the files in this folder instead of the cache")
    dp.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check")
    pp = msub.add_parser("path", parents=[common], help="print the local path of a file (no network)")
    pp.add_argument("name", metavar="NAME")
    p.set_defaults(func=_cmd_models, models_parser=p)


def _cmd_models(args) -> int:
    from ctrlnet import hub

    action = args.models_command
    if action is None:
        args.models_parser.print_help()
        return 2
    try:
        if action == "list":
            rows = hub.list_models(args.kind)
            width = max(len(m.name) for m in rows)
            for m in rows:
                found = hub.find(m.name, args.dir, args.cache_dir)
                here = "here" if all(found.values()) else "-"
                print(f"{m.name:<{width}}  {m.kind:<10}  {hub.human_size(m.size):>9}  {here:<4}  "
                      f"{m.repo}/{m.filename}  {m.description}")
            return 0
        if action == "path":
            print(hub.resolve(args.name, args.dir, args.cache_dir))
            return 0
        for name in args.names:
            hub.get_model(name)  # fail on a typo before any download starts
        for name in args.names:
            print(hub.download(name, cache_dir=args.cache_dir, local_dir=args.local_dir, dirs=args.dir,
                               verify=not args.no_verify, progress=lambda s: print(s, file=sys.stderr)))
        return 0
    except hub.MissingModelError as e:
        print(f"ctrlnet models {action}: {e}", file=sys.stderr)
        return 1
