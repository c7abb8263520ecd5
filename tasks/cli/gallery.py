"""`tilerec gallery`: the people that `run --identify` names (docs/faces.md).

  tilerec gallery add NAME PHOTO… [--gallery G] [--box X,Y,W,H]   enroll from photos (a worker detects and embeds)
  tilerec gallery add NAME --from RUN GROUP [--gallery G]         name a group of unknown faces of a run
  tilerec gallery list [--gallery G] [--json]                     the people, their embeddings and photos
  tilerec gallery rename OLD NEW [--gallery G]
  tilerec gallery remove NAME [--gallery G]                       the person and every embedding of theirs

With --broker (or TILEREC_BROKER_URL) on that cluster's store; without, in the private cluster's Redis, whose data
is kept in TILEREC_LOCAL_DATA so the people enrolled now are there for the next `tilerec run --identify`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from rich.console import Console

from tasks.cli.clusters import Cluster, local_store, open_cluster, remote_cluster
from tasks.cli.errors import EXIT_OK, CliError, say
from tasks.cli.inputs import check_image, number_list
from tasks.cli.settings import RunSettings, run_settings


def _settings(args: argparse.Namespace, quiet: bool = True) -> RunSettings:
    """Where the gallery is; `quiet`: no warning when no worker answers (only `add` from photos needs one)."""
    return replace(run_settings(args), quiet=quiet, keep_data=True)


@contextlib.contextmanager
def _store(args: argparse.Namespace, console: Console) -> Iterator[Cluster]:
    """The galleries' Redis: the cluster's, or the private one with its kept data (no worker needed)."""
    settings = _settings(args)
    if settings.broker:
        with remote_cluster(settings.broker, settings, console) as cluster:
            yield cluster
    else:
        with local_store() as cluster:
            yield cluster


@contextlib.contextmanager
def _gallery_errors() -> Iterator[None]:
    from tasks.gallery import GalleryError

    try:
        yield
    except GalleryError as error:
        raise CliError(str(error)) from None


def _box(values: list[int] | None) -> list[int] | None:
    if values is not None and (len(values) != 4 or min(values) < 0 or min(values[2:]) < 1):
        raise CliError(f"--box wants X,Y,W,H in whole pixels (width and height at least 1), got {values}")
    return values


def cmd_add(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if args.source:
        if args.photos:
            raise CliError("gallery add takes photos or --from RUN GROUP, not both")
        return add_group(args, console)
    if not args.photos:
        raise CliError("gallery add needs photos of the person (or --from RUN GROUP to name a group of a run)")
    box = _box(args.box)
    targets = [check_image(photo) for photo in args.photos]
    from tasks import client

    with open_cluster(targets, _settings(args, args.quiet), console) as cluster, _gallery_errors():
        added = client.gallery_add(args.name, targets, args.gallery, box=box, upload=cluster.upload,
                                   timeout=args.timeout)  # fmt: skip
    if not args.quiet:
        say(console, f"tilerec: enrolled {added['name']} in gallery {added['gallery']} from {added['added']} "
                     f"photo(s); {added['embeddings']} embedding(s) in all")  # fmt: skip
    return EXIT_OK


def add_group(args: argparse.Namespace, console: Console) -> int:
    """`--from RUN GROUP`: the embeddings a run kept of a group of unknown faces (RUN/faces.npz) go to the person."""
    from tasks.cli.people import read_group
    from tasks.gallery import add_faces

    run, group = args.source
    model, enrolled = read_group(run, group)
    with _store(args, console), _gallery_errors():
        from tasks.celery import store_client

        total = add_faces(store_client(), args.gallery, args.name, model, enrolled)
    if not args.quiet:
        say(console, f"tilerec: {args.name} in gallery {args.gallery}: {len(enrolled)} face(s) of {group} from "
                     f"{run}; {total} embedding(s) in all")  # fmt: skip
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from tasks import client

    with _store(args, Console(stderr=True)), _gallery_errors():
        listed = client.gallery_list(args.gallery)
    if args.json:
        print(json.dumps(listed, indent=2))
        return EXIT_OK
    if not listed["people"]:
        print(f"gallery {listed['gallery']}: no people")
        return EXIT_OK
    print(f"gallery {listed['gallery']} ({listed['model']}): {len(listed['people'])} people")
    width = max(len(person["name"]) for person in listed["people"]) + 2
    for person in listed["people"]:
        print(f"  {person['name']:{width}}{person['embeddings']} embedding(s): {', '.join(person['images'])}")
    return EXIT_OK


def cmd_rename(args: argparse.Namespace) -> int:
    from tasks import client

    console = Console(stderr=True)
    with _store(args, console), _gallery_errors():
        client.gallery_rename(args.old, args.new, args.gallery)
    if not args.quiet:
        say(console, f"tilerec: renamed {args.old} to {args.new.strip()} in gallery {args.gallery}")
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    from tasks import client

    console = Console(stderr=True)
    with _store(args, console), _gallery_errors():
        removed = client.gallery_remove(args.name, args.gallery)
    if not args.quiet:
        say(console, f"tilerec: removed {args.name} and {removed} embedding(s) from gallery {args.gallery}")
    return EXIT_OK


def add_gallery(commands: Any, cluster_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `gallery` subcommand's parsers; `cluster_flags` adds --broker, --workers, --timeout and --quiet."""
    parser = commands.add_parser(
        "gallery",
        help="the people that --identify names: add (enroll from photos), list, rename, remove",
        description="Galleries of people in the cluster's Redis (without --broker: the private cluster's, kept in "
        "TILEREC_LOCAL_DATA). Embeddings are biometric data: `remove` deletes a person's every embedding.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="enroll a person from photos, or name a group of unknown faces of a run")
    add.add_argument("name", metavar="NAME", help="the person's name")
    add.add_argument("photos", nargs="*", metavar="PHOTO", help="photos of the person (the only or largest face)")
    add.add_argument("--box", type=number_list(int), metavar="X,Y,W,H", help="the face to enroll, in every photo")
    add.add_argument(
        "--from", dest="source", nargs=2, metavar=("RUN", "GROUP"),
        help="a run's folder (run --identify --out RUN) and one of its groups of unknown faces (unknown-3)",
    )  # fmt: skip
    add.add_argument(
        "--shared-path", action="store_true", help="with --broker: send file paths instead of uploading the photos"
    )
    add.set_defaults(handler=cmd_add)
    listing = actions.add_parser("list", help="the people of a gallery")
    listing.add_argument("--json", action="store_true", help="as JSON")
    listing.set_defaults(handler=cmd_list)
    renaming = actions.add_parser("rename", help="give a person another name")
    renaming.add_argument("old", metavar="OLD")
    renaming.add_argument("new", metavar="NEW")
    renaming.set_defaults(handler=cmd_rename)
    removing = actions.add_parser("remove", help="delete a person and every embedding of theirs")
    removing.add_argument("name", metavar="NAME")
    removing.set_defaults(handler=cmd_remove)
    for action in (add, listing, renaming, removing):
        action.add_argument("--gallery", default="default", metavar="G", help="the gallery (default: default)")
        cluster_flags(action)
