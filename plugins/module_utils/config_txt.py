# Copyright (c) pifarm.inference maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Raspberry Pi ``config.txt``: conditional sections and idempotent line edits.

The firmware reads ``config.txt`` line by line. A ``[filter]`` line (``[pi5]``, ``[all]``,
``[board-type=0x17]`` ...) makes every following line conditional until the next filter line,
so the file is a sequence of *blocks*: the lines before the first filter, then one block per
filter line. Edits here work inside one block and leave every other byte of the file alone:
comments, blank lines, spacing, other blocks and the trailing newline (or its absence).

Which block is "section S": the LAST block opened by a ``[S]`` line. For ``S == "all"`` a file
without any ``[all]`` line uses the lines before the first filter instead (they apply to all
boards). When no block exists, ``[S]`` is appended at the end of the file, after a blank line.
New lines go after the last non-blank line of their block, so a block that is followed by a
blank line and the next filter keeps that layout.

Line syntax as the firmware reads it: ``#`` at the start of a line is a comment (a commented
``#key=value`` never counts as a setting); leading whitespace is tolerated; there is no space
around ``=`` (``key = value`` is a different key to the firmware, so it is not matched either).
``dtparam=a=on,b`` carries several base device-tree parameters; each is matched on its own.

This file has no Ansible imports: the boot_config module and the unit tests use it directly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

#: Model filters of the Raspberry Pi firmware (config.txt documentation, "Model filters").
MODEL_FILTERS: tuple[str, ...] = (
    "pi0",
    "pi0w",
    "pi02",
    "pi1",
    "pi2",
    "pi3",
    "pi3+",
    "pi4",
    "pi400",
    "pi5",
    "pi500",
    "cm0",
    "cm1",
    "cm3",
    "cm3+",
    "cm4",
    "cm4s",
    "cm5",
)
#: Filters that are neither a model nor a pattern.
GENERAL_FILTERS: tuple[str, ...] = ("all", "none", "tryboot")

# Filters that carry a value, with the form shown to the operator.
_PATTERN_FILTERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"board-type=0x[0-9A-Fa-f]+"), "board-type=0x<type>"),
    (re.compile(r"EDID=[^\s\[\]]+"), "EDID=<manufacturer>-<product>"),
    (re.compile(r"gpio[0-9]+=[01]"), "gpio<N>=0|1"),
    (re.compile(r"0x[0-9A-Fa-f]{8,16}"), "0x<serial>"),
    (re.compile(r"HDMI:[01]"), "HDMI:0|1"),
    (re.compile(r"boot_partition=[0-9]+"), "boot_partition=<N>"),
)

#: Every accepted section form, in the order an error message lists them.
ACCEPTED_SECTION_FORMS: tuple[str, ...] = (
    GENERAL_FILTERS + MODEL_FILTERS + tuple(form for _pattern, form in _PATTERN_FILTERS)
)

_NAME_RE = re.compile(r"[A-Za-z0-9_+.-]+")
# Plain settings may also use the firmware's "variable:index" form (hdmi_mode:1=...).
_SETTING_KEY_RE = re.compile(r"[A-Za-z0-9_+.-]+(?::[0-9]+)?")
# Keys with their own option: a plain setting with these names would edit the wrong line.
_RESERVED_KEYS = {"dtparam": "dtparams", "dtoverlay": "dtoverlays"}


class ConfigTxtError(ValueError):
    """An input that cannot be written to config.txt; the message names option and value."""


# --------------------------------------------------------------------------- validation


def is_section_filter(section: str) -> bool:
    """True when ``section`` is a conditional filter the firmware knows (without brackets)."""
    if section in GENERAL_FILTERS or section in MODEL_FILTERS:
        return True
    return any(pattern.fullmatch(section) for pattern, _form in _PATTERN_FILTERS)


def validate_section(section: str) -> str:
    """Return ``section`` or raise ConfigTxtError listing the accepted forms."""
    if not is_section_filter(section):
        raise ConfigTxtError(
            f"section {section!r} is not a config.txt filter; use one of {', '.join(ACCEPTED_SECTION_FORMS)}"
        )
    return section


def _check_value(option: str, key: str, value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ConfigTxtError(f"{option} value of {key!r} contains a line break: {value!r}")
    if value.startswith("["):
        raise ConfigTxtError(
            f"{option} value of {key!r} starts with '[', which the firmware would read as a filter: {value!r}"
        )
    if value != value.strip():
        raise ConfigTxtError(
            f"{option} value of {key!r} has leading or trailing whitespace, which the firmware "
            f"does not ignore: {value!r}"
        )
    return value


def _value_text(option: str, key: str, value: object, true: str, false: str) -> str:
    # bool before int: True is an int in Python.
    if isinstance(value, bool):
        return true if value else false
    if isinstance(value, (int, float, str)):
        return _check_value(option, key, str(value))
    raise ConfigTxtError(f"{option} value of {key!r} must be a string or a number, got {value!r}")


def normalise_settings(settings: Mapping[str, object], state: str = "present") -> dict[str, str | None]:
    """Validate plain ``key=value`` settings and return their text values.

    Booleans become ``1``/``0``, numbers their decimal text. With ``state=absent`` the values are
    not used (a key is removed whatever its value) and may be null.
    """
    result: dict[str, str | None] = {}
    for key, value in settings.items():
        if not isinstance(key, str) or not _SETTING_KEY_RE.fullmatch(key):
            raise ConfigTxtError(
                f"settings key {key!r} is not a config.txt key: use letters, digits and _ + . - "
                "(optionally :<index>)"
            )
        if key in _RESERVED_KEYS:
            raise ConfigTxtError(f"settings key {key!r} has its own option: use {_RESERVED_KEYS[key]}")
        if state == "absent":
            result[key] = None
        elif value is None:
            raise ConfigTxtError(f"settings value of {key!r} is null: give the value to write")
        else:
            result[key] = _value_text("settings", key, value, "1", "0")
    return result


def normalise_dtparams(dtparams: Mapping[str, object], state: str = "present") -> dict[str, str | None]:
    """Validate base device-tree parameters; null means a bare ``dtparam=name``.

    Booleans become ``on``/``off`` (YAML reads an unquoted ``on`` as true). A value may not contain
    ``,`` (it separates parameters on a dtparam line). With ``state=absent`` values are not used.
    """
    result: dict[str, str | None] = {}
    for name, value in dtparams.items():
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigTxtError(
                f"dtparams name {name!r} is not a device-tree parameter name: use letters, digits and _ + . -"
            )
        if state == "absent" or value is None:
            result[name] = None
            continue
        text = _value_text("dtparams", name, value, "on", "off")
        if text == "":
            raise ConfigTxtError(f"dtparams value of {name!r} is empty: use null for a bare dtparam={name}")
        if "," in text:
            raise ConfigTxtError(
                f"dtparams value of {name!r} contains ',', which separates parameters: {text!r}"
            )
        result[name] = text
    return result


def validate_dtoverlays(dtoverlays: Sequence[object]) -> list[str]:
    """Validate overlay specs (``name`` or ``name,param=value,...``) and return them."""
    result: list[str] = []
    for spec in dtoverlays:
        if not isinstance(spec, str) or not spec:
            raise ConfigTxtError(f"dtoverlays item {spec!r} must be a non-empty overlay spec")
        if any(char.isspace() for char in spec):
            raise ConfigTxtError(f"dtoverlays item {spec!r} contains whitespace or a line break")
        if spec.startswith(("[", "#", "=")):
            raise ConfigTxtError(f"dtoverlays item {spec!r} does not start with an overlay name")
        result.append(spec)
    return result


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class SettingLine:
    """A ``key=value`` line split so that only the value can be rewritten."""

    indent: str
    key: str
    value: str
    trailing: str  # trailing whitespace, including the "\r" of a CRLF line

    def render(self, value: str) -> str:
        return f"{self.indent}{self.key}={value}{self.trailing}"


def parse_setting_line(line: str) -> SettingLine | None:
    """Split a ``key=value`` line; None for comments, filters, blank and other lines."""
    body = line.rstrip()
    stripped = body.lstrip()
    if not stripped or stripped[0] in "#[" or "=" not in stripped:
        return None
    key, _equals, value = stripped.partition("=")
    return SettingLine(body[: len(body) - len(stripped)], key, value, line[len(body) :])


def filter_name(line: str) -> str | None:
    """The filter a ``[filter]`` line opens (text inside the brackets), else None."""
    stripped = line.strip()
    if not stripped.startswith("["):
        return None
    end = stripped.find("]")
    return stripped[1:end] if end > 0 else stripped[1:]


@dataclass(frozen=True)
class Block:
    """Lines ``start`` to ``end`` (exclusive) governed by one filter line.

    ``header`` is the index of the ``[name]`` line; None for the lines before the first filter.
    """

    name: str
    header: int | None
    start: int
    end: int


def parse_blocks(lines: Sequence[str]) -> list[Block]:
    """Cut ``lines`` into blocks: the leading block (named "all") and one per filter line."""
    headers = [(index, name) for index, line in enumerate(lines) if (name := filter_name(line)) is not None]
    first = headers[0][0] if headers else len(lines)
    blocks = [Block("all", None, 0, first)]
    for position, (index, name) in enumerate(headers):
        end = headers[position + 1][0] if position + 1 < len(headers) else len(lines)
        blocks.append(Block(name, index, index + 1, end))
    return blocks


def find_section_block(lines: Sequence[str], section: str) -> Block | None:
    """The block that "section" means (see the module docstring), or None when there is none."""
    blocks = parse_blocks(lines)
    opened = [block for block in blocks if block.header is not None and block.name == section]
    if opened:
        return opened[-1]
    if section == "all":
        return blocks[0]
    return None


# --------------------------------------------------------------------------- editing


class ConfigTxt:
    """An editable config.txt that renders back byte for byte where nothing was changed."""

    def __init__(self, text: str) -> None:
        self.lines: list[str] = text.split("\n") if text else []
        # A file ending in "\n" splits into a last empty element, which is not a line.
        self.trailing_newline = not text or text.endswith("\n")
        if text and self.trailing_newline:
            self.lines.pop()
        # New lines in a CRLF file get CRLF too.
        self.line_end = "\r" if self.lines and self.lines[0].endswith("\r") else ""

    def render(self) -> str:
        if not self.lines:
            return ""
        return "\n".join(self.lines) + ("\n" if self.trailing_newline else "")

    # blocks ---------------------------------------------------------------

    def block(self, section: str) -> Block | None:
        return find_section_block(self.lines, section)

    def _block_for_append(self, section: str) -> Block:
        block = self.block(section)
        if block is not None:
            return block
        if self.lines:
            self.lines.append(self.line_end)
        self.lines.append(f"[{section}]{self.line_end}")
        index = len(self.lines) - 1
        return Block(section, index, index + 1, index + 1)

    def _append(self, section: str, text: str) -> None:
        block = self._block_for_append(section)
        position = block.start
        for index in range(block.start, block.end):
            if self.lines[index].strip():
                position = index + 1
        self.lines.insert(position, text + self.line_end)

    def _setting_lines(self, block: Block, key: str) -> list[tuple[int, SettingLine]]:
        found = []
        for index in range(block.start, block.end):
            parsed = parse_setting_line(self.lines[index])
            if parsed is not None and parsed.key == key:
                found.append((index, parsed))
        return found

    # plain settings -------------------------------------------------------

    def set_setting(self, section: str, key: str, value: str) -> bool:
        """Make ``key=value`` effective in the block; rewrites the last ``key=`` line in place."""
        block = self.block(section)
        found = self._setting_lines(block, key) if block else []
        if found:
            index, line = found[-1]
            if line.value == value:
                return False
            self.lines[index] = line.render(value)
            return True
        self._append(section, f"{key}={value}")
        return True

    def remove_setting(self, section: str, key: str) -> bool:
        """Remove every ``key=...`` line of the block, whatever its value."""
        block = self.block(section)
        found = self._setting_lines(block, key) if block else []
        for index, _line in reversed(found):
            del self.lines[index]
        return bool(found)

    # dtparams -------------------------------------------------------------

    def _dtparam_items(self, block: Block, name: str) -> list[tuple[int, SettingLine, list[str], int]]:
        found = []
        for index, line in self._setting_lines(block, "dtparam"):
            items = line.value.split(",")
            for position, item in enumerate(items):
                if item.partition("=")[0] == name:
                    found.append((index, line, items, position))
        return found

    def set_dtparam(self, section: str, name: str, value: str | None) -> bool:
        """Make ``name`` (bare when value is None, else ``name=value``) effective in the block.

        An existing occurrence (the last one, also inside ``dtparam=a=on,b=off``) is rewritten in
        place, touching only that parameter; otherwise ``dtparam=...`` is appended.
        """
        wanted = name if value is None else f"{name}={value}"
        block = self.block(section)
        found = self._dtparam_items(block, name) if block else []
        if not found:
            self._append(section, f"dtparam={wanted}")
            return True
        index, line, items, position = found[-1]
        if items[position] == wanted:
            return False
        items[position] = wanted
        self.lines[index] = line.render(",".join(items))
        return True

    def remove_dtparam(self, section: str, name: str) -> bool:
        """Remove parameter ``name`` from the block's dtparam lines; a line left empty goes."""
        block = self.block(section)
        if block is None:
            return False
        changed = False
        for index, line in reversed(self._setting_lines(block, "dtparam")):
            items = line.value.split(",")
            kept = [item for item in items if item.partition("=")[0] != name]
            if len(kept) == len(items):
                continue
            changed = True
            if kept:
                self.lines[index] = line.render(",".join(kept))
            else:
                del self.lines[index]
        return changed

    # dtoverlays -----------------------------------------------------------

    def _overlay_lines(self, block: Block, spec: str) -> list[int]:
        return [index for index, line in self._setting_lines(block, "dtoverlay") if line.value == spec]

    def add_dtoverlay(self, section: str, spec: str) -> bool:
        """Make sure the block has a ``dtoverlay=<spec>`` line (the whole spec, exactly)."""
        block = self.block(section)
        if block is not None and self._overlay_lines(block, spec):
            return False
        self._append(section, f"dtoverlay={spec}")
        return True

    def remove_dtoverlay(self, section: str, spec: str) -> bool:
        """Remove every ``dtoverlay=<spec>`` line of the block."""
        block = self.block(section)
        found = self._overlay_lines(block, spec) if block else []
        for index in reversed(found):
            del self.lines[index]
        return bool(found)


@dataclass(frozen=True)
class EditRequest:
    """One boot_config task: what should (or should not) be in the block of ``section``.

    Build it with :meth:`validated` from raw option values; the fields hold the text that is
    written (settings and dtparams values, None for a bare dtparam or for state=absent).
    """

    section: str
    settings: Mapping[str, str | None] = field(default_factory=dict)
    dtparams: Mapping[str, str | None] = field(default_factory=dict)
    dtoverlays: Sequence[str] = ()
    state: str = "present"

    @classmethod
    def validated(
        cls,
        section: str,
        settings: Mapping[str, object] | None = None,
        dtparams: Mapping[str, object] | None = None,
        dtoverlays: Sequence[object] | None = None,
        state: str = "present",
    ) -> EditRequest:
        """Check every input (section first) and return the request; raises ConfigTxtError."""
        if state not in ("present", "absent"):
            raise ConfigTxtError(f"state {state!r} is not present or absent")
        return cls(
            section=validate_section(section),
            settings=normalise_settings(settings or {}, state),
            dtparams=normalise_dtparams(dtparams or {}, state),
            dtoverlays=tuple(validate_dtoverlays(dtoverlays or [])),
            state=state,
        )


def edit_config_txt(text: str, request: EditRequest) -> str:
    """Apply one request to the text of a config.txt and return the new text.

    ``present`` sets settings, then dtparams, then adds overlays, so new base dtparams are
    written above new overlays (a dtparam line after an overlay that exports a parameter of the
    same name would set the overlay's). ``absent`` removes the settings keys (any value),
    dtparams (any value) and exact overlay lines from the section's block only.
    When nothing needs to change the returned string is ``text`` itself, byte for byte.
    """
    if request.state not in ("present", "absent"):
        raise ConfigTxtError(f"state {request.state!r} is not present or absent")
    section = validate_section(request.section)
    config = ConfigTxt(text)
    changed = False
    if request.state == "present":
        for key, value in request.settings.items():
            if value is None:
                raise ConfigTxtError(f"settings value of {key!r} is null: give the value to write")
            changed |= config.set_setting(section, key, value)
        for name, param in request.dtparams.items():
            changed |= config.set_dtparam(section, name, param)
        for spec in request.dtoverlays:
            changed |= config.add_dtoverlay(section, spec)
    else:
        for key in request.settings:
            changed |= config.remove_setting(section, key)
        for name in request.dtparams:
            changed |= config.remove_dtparam(section, name)
        for spec in request.dtoverlays:
            changed |= config.remove_dtoverlay(section, spec)
    return config.render() if changed else text
