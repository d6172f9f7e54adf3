"""Input images for `fastaspp predict`: paths and directories to (image, output stem) pairs, all
checked before the first is processed."""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Sequence

from fastaspp.data.base import IMAGE_EXTENSIONS, image_header, problem_report


def _directory_images(directory: str) -> list[str]:
    """The image files directly inside a directory (IMAGE_EXTENSIONS, any case), sorted by name."""
    names = sorted(name for name in os.listdir(directory)
                   if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                   and os.path.isfile(os.path.join(directory, name)))
    if not names:
        raise ValueError(f"directory {directory} holds no images ({', '.join(IMAGE_EXTENSIONS)}) "
                         f"directly inside it")
    return [os.path.join(directory, name) for name in names]


def _candidate_stems(path: str) -> list[str]:
    """Output stems for path, shortest first: stem, stem_ext, parent_stem_ext, grandparent_parent_stem_ext,
    ... up to the whole absolute path."""
    parts = [part for part in os.path.splitdrive(os.path.abspath(path))[1].split(os.sep) if part]
    stem, ext = os.path.splitext(parts[-1])
    stems = [stem] + ([f"{stem}_{ext[1:]}"] if ext else [])
    for parent in reversed(parts[:-1]):
        stems.append(f"{parent}_{stems[-1]}")
    return stems


def _unique_stems(paths: Sequence[str]) -> list[str]:
    """One output stem per path, no two equal ignoring case (see collect_images for the rule)."""
    candidates = [_candidate_stems(path) for path in paths]
    level = [0] * len(paths)
    while True:
        groups = defaultdict(list)
        for i, stems in enumerate(candidates):
            groups[stems[level[i]].casefold()].append(i)
        clashing = [i for group in groups.values() if len(group) > 1 for i in group]
        movable = [i for i in clashing if level[i] + 1 < len(candidates[i])]
        if not movable:
            break
        for i in movable:
            level[i] += 1
    # Still clashing at their whole paths: distinct files whose names join the same way, such as
    # d/x.png (pushed past "x" by d/x.jpg) and an extensionless d/x_png. Number them, in input order,
    # around the names already unique.
    chosen = [stems[level[i]] for i, stems in enumerate(candidates)]
    unresolved = set(clashing)
    taken = {stem.casefold() for i, stem in enumerate(chosen) if i not in unresolved}
    for i in clashing:
        stem, n = chosen[i], 2
        while stem.casefold() in taken:
            stem, n = f"{chosen[i]}_{n}", n + 1
        chosen[i] = stem
        taken.add(stem.casefold())
    return chosen


def collect_images(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(image path, output stem) pairs for `fastaspp predict`, checked before any image is processed.

    A directory stands for the image files directly inside it (IMAGE_EXTENSIONS, any case, sorted by
    name; none is an error); a file is taken as given, whatever its extension. Raises
    FileNotFoundError listing every path that does not exist, then ValueError naming every file
    that PIL cannot read as an image (from its header; pixels are not decoded). A file reached twice
    (same real path: given twice, or by name and through its directory) is kept once, where first met.

    Output stems are unique ignoring case (outputs may land on a case-insensitive file system). Each
    input starts from its file's stem; while stems clash, every input in a clash takes the next
    longer name: the extension appended (photo.png, photo.jpg -> photo_png, photo_jpg), then its
    parent directories' names prefixed one at a time (a/x.png, b/x.png -> x_png twice, then a_x_png,
    b_x_png). Names still clashing with the whole path spelled out are numbered _2, _3, ... in
    input order. Order of the pairs: the inputs' order, directories expanded in place.
    """
    if not paths:
        raise ValueError("no input images given")
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} input path(s) do not exist: {', '.join(missing)}")
    files, seen = [], set()
    for path in paths:
        for file in _directory_images(path) if os.path.isdir(path) else [path]:
            real = os.path.realpath(file)
            if real not in seen:
                seen.add(real)
                files.append(file)
    problems = []
    for file in files:
        try:
            image_header(file)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError(problem_report(f"{len(problems)} of {len(files)} input images cannot be read", problems))
    return list(zip(files, _unique_stems(files)))
