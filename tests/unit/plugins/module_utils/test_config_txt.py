"""config_txt: sections, validation and byte-exact edits of real Raspberry Pi OS config.txt files."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest
from ansible_collections.pifarm.inference.plugins.module_utils.config_txt import (
    ACCEPTED_SECTION_FORMS,
    MODEL_FILTERS,
    ConfigTxt,
    ConfigTxtError,
    EditRequest,
    edit_config_txt,
    find_section_block,
    is_section_filter,
    normalise_dtparams,
    normalise_settings,
    parse_blocks,
    parse_setting_line,
    validate_dtoverlays,
    validate_section,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "config_txt"
BOOKWORM = (FIXTURES / "bookworm-config.txt").read_text()
HAND_EDITED = (FIXTURES / "pi5-hand-edited-config.txt").read_text()


def edit(text: str, section: str, **fields) -> str:
    return edit_config_txt(text, EditRequest(section, **fields))


def changes(before: str, after: str) -> list[str]:
    """The +/- lines of the unified diff from before to after."""
    diff = difflib.unified_diff(before.split("\n"), after.split("\n"), lineterm="", n=0)
    return [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def lines_of(text: str, section: str) -> list[str]:
    """The lines of the block that "section" means in text."""
    config = ConfigTxt(text)
    block = find_section_block(config.lines, section)
    assert block is not None
    return config.lines[block.start : block.end]


# --------------------------------------------------------------------------- fixtures


def test_fixtures_are_what_the_readme_says():
    assert BOOKWORM.startswith("# For more options and information see\n# http://rptl.io/configtxt\n")
    assert BOOKWORM.endswith("\n[cm5]\ndtoverlay=dwc2,dr_mode=host\n\n[all]\n")
    assert "\r" not in BOOKWORM + HAND_EDITED
    assert not HAND_EDITED.endswith("\n")
    assert "dtparam=pciex1,pciex1_gen=2  \n" in HAND_EDITED


# --------------------------------------------------------------------------- sections


def test_blocks_of_the_bookworm_file():
    config = ConfigTxt(BOOKWORM)
    blocks = parse_blocks(config.lines)
    assert [(b.name, b.header) for b in blocks] == [("all", None), ("cm4", 41), ("cm5", 47), ("all", 50)]
    assert config.lines[41] == "[cm4]"
    assert config.lines[blocks[0].end - 1] == ""
    assert blocks[-1].start == blocks[-1].end == len(config.lines)


def test_all_means_the_last_all_block():
    assert lines_of(BOOKWORM, "all") == []
    assert lines_of(HAND_EDITED, "all") == ["dtparam=audio=off,i2c_arm=on", "enable_uart=1"]


def test_all_means_the_leading_lines_when_there_is_no_all_filter():
    without_all = BOOKWORM.removesuffix("\n[all]\n")
    block = lines_of(without_all, "all")
    assert block[0] == "# For more options and information see"
    assert block[-2:] == ["arm_boost=1", ""]


def test_a_missing_section_has_no_block():
    assert find_section_block(ConfigTxt(BOOKWORM).lines, "pi5") is None


@pytest.mark.parametrize(
    "section",
    [
        *MODEL_FILTERS,
        "all",
        "none",
        "tryboot",
        "board-type=0x17",
        "EDID=DEL-DELL_U2422H",
        "gpio4=1",
        "gpio27=0",
        "0x12345678",
        "0x10000000abcdef12",
        "HDMI:1",
        "boot_partition=2",
    ],
)
def test_filters_the_firmware_knows(section):
    assert is_section_filter(section)
    assert validate_section(section) == section


@pytest.mark.parametrize(
    "section",
    ["pi6", "PI5", "[pi5]", "", "all ", "board-type=17", "gpio4=2", "EDID=", "0x1234", "HDMI:2", "pi5+cm4"],
)
def test_unknown_filters_fail_with_the_accepted_forms(section):
    assert not is_section_filter(section)
    with pytest.raises(ConfigTxtError) as error:
        validate_section(section)
    message = str(error.value)
    assert message.startswith(f"section {section!r} is not a config.txt filter; use one of all, none, ")
    assert all(form in message for form in ACCEPTED_SECTION_FORMS)
    assert "board-type=0x<type>" in message
    assert "gpio<N>=0|1" in message


# --------------------------------------------------------------------------- validation


def test_settings_values_become_firmware_text():
    assert normalise_settings(
        {"arm_boost": True, "gpu_mem": 16, "kernel": "kernel_2712.img", "x": False}
    ) == {
        "arm_boost": "1",
        "gpu_mem": "16",
        "kernel": "kernel_2712.img",
        "x": "0",
    }
    assert normalise_settings({"hdmi_mode:1": 4}) == {"hdmi_mode:1": "4"}
    assert normalise_settings({"arm_boost": None}, "absent") == {"arm_boost": None}


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"arm boost": 1}, "settings key 'arm boost' is not a config.txt key"),
        ({"arm_boost=1": 1}, "settings key 'arm_boost=1' is not a config.txt key"),
        ({"[pi5]": 1}, "settings key '[pi5]' is not a config.txt key"),
        ({"#arm_boost": 1}, "settings key '#arm_boost' is not a config.txt key"),
        ({"hdmi_mode:x": 1}, "settings key 'hdmi_mode:x' is not a config.txt key"),
        ({"": 1}, "settings key '' is not a config.txt key"),
        ({"dtparam": "audio=on"}, "settings key 'dtparam' has its own option: use dtparams"),
        ({"dtoverlay": "disable-bt"}, "settings key 'dtoverlay' has its own option: use dtoverlays"),
        ({"arm_freq": "2800\n[all]"}, "settings value of 'arm_freq' contains a line break"),
        ({"arm_freq": "2800\r"}, "settings value of 'arm_freq' contains a line break"),
        ({"kernel": "[pi5]"}, "settings value of 'kernel' starts with '['"),
        ({"arm_freq": " 2800"}, "settings value of 'arm_freq' has leading or trailing whitespace"),
        ({"arm_freq": None}, "settings value of 'arm_freq' is null"),
        ({"arm_freq": [2800]}, "settings value of 'arm_freq' must be a string or a number"),
    ],
)
def test_bad_settings_are_refused(settings, fragment):
    with pytest.raises(ConfigTxtError, match="^" + re.escape(fragment)):
        normalise_settings(settings)


def test_dtparams_values_become_firmware_text():
    assert normalise_dtparams({"pciex1": None, "pciex1_gen": 3, "audio": True, "spi": False}) == {
        "pciex1": None,
        "pciex1_gen": "3",
        "audio": "on",
        "spi": "off",
    }
    assert normalise_dtparams({"pciex1_gen": 3}, "absent") == {"pciex1_gen": None}


@pytest.mark.parametrize(
    ("dtparams", "fragment"),
    [
        ({"pci ex1": None}, "dtparams name 'pci ex1' is not a device-tree parameter name"),
        ({"audio=on": None}, "dtparams name 'audio=on' is not a device-tree parameter name"),
        ({"fan_temp0": "50000,fan_temp0_hyst=5000"}, "dtparams value of 'fan_temp0' contains ','"),
        ({"audio": ""}, "dtparams value of 'audio' is empty"),
        ({"audio": "on\ndtoverlay=x"}, "dtparams value of 'audio' contains a line break"),
        ({"audio": "[all]"}, "dtparams value of 'audio' starts with '['"),
    ],
)
def test_bad_dtparams_are_refused(dtparams, fragment):
    with pytest.raises(ConfigTxtError, match="^" + re.escape(fragment)):
        normalise_dtparams(dtparams)


def test_dtoverlay_specs():
    specs = ["disable-bt", "pciex1-compat-pi5,no-mip", "dwc2,dr_mode=host"]
    assert validate_dtoverlays(specs) == specs


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "dtoverlays item '' must be a non-empty overlay spec"),
        ("disable bt", "dtoverlays item 'disable bt' contains whitespace"),
        ("disable-bt\n[all]", "dtoverlays item 'disable-bt\\n[all]' contains whitespace"),
        ("[pi5]", "dtoverlays item '[pi5]' does not start with an overlay name"),
        (None, "dtoverlays item None must be a non-empty overlay spec"),
    ],
)
def test_bad_dtoverlays_are_refused(spec, fragment):
    with pytest.raises(ConfigTxtError, match="^" + re.escape(fragment)):
        validate_dtoverlays([spec])


def test_setting_lines():
    line = parse_setting_line("  arm_freq=2800 \r")
    assert line is not None
    assert (line.indent, line.key, line.value, line.trailing) == ("  ", "arm_freq", "2800", " \r")
    assert line.render("2400") == "  arm_freq=2400 \r"
    for other in ("#arm_freq=2800", "[pi5]", "", "   ", "initramfs initrd.img followkernel"):
        assert parse_setting_line(other) is None


# --------------------------------------------------------------------------- the bookworm file


def test_pcie_dtparams_add_exactly_two_lines_to_the_last_all_block():
    dtparams = normalise_dtparams({"pciex1": None, "pciex1_gen": 3})
    after = edit(BOOKWORM, "all", dtparams=dtparams)
    assert changes(BOOKWORM, after) == ["+dtparam=pciex1", "+dtparam=pciex1_gen=3"]
    assert after == BOOKWORM + "dtparam=pciex1\ndtparam=pciex1_gen=3\n"
    again = edit(after, "all", dtparams=dtparams)
    assert again == after


def test_a_setting_in_all_goes_to_the_last_all_block_not_the_leading_lines():
    after = edit(BOOKWORM, "all", settings={"arm_boost": "0"})
    assert changes(BOOKWORM, after) == ["+arm_boost=0"]
    assert after.endswith("[all]\narm_boost=0\n")
    assert "\narm_boost=1\n" in after


def test_cm4_edits_stay_inside_cm4():
    after = edit(
        BOOKWORM, "cm4", settings={"otg_mode": "0"}, dtparams={"pciex1": None}, dtoverlays=["disable-bt"]
    )
    assert changes(BOOKWORM, after) == [
        "-otg_mode=1",
        "+otg_mode=0",
        "+dtparam=pciex1",
        "+dtoverlay=disable-bt",
    ]
    block = lines_of(after, "cm4")
    assert block[-4:] == ["otg_mode=0", "dtparam=pciex1", "dtoverlay=disable-bt", ""]
    assert lines_of(after, "cm5") == ["dtoverlay=dwc2,dr_mode=host", ""]
    assert after.count("[cm4]") == 1
    assert "\n# (e.g. for USB device mode) or if USB support is not required.\notg_mode=0\n" in after


def test_a_missing_section_is_appended_at_the_end():
    after = edit(BOOKWORM, "pi5", dtoverlays=["pciex1-compat-pi5,no-mip"])
    assert after == BOOKWORM + "\n[pi5]\ndtoverlay=pciex1-compat-pi5,no-mip\n"


def test_settings_dtparams_then_overlays_in_a_new_section():
    after = edit(
        BOOKWORM,
        "board-type=0x17",
        settings={"usb_max_current_enable": "1"},
        dtparams={"pciex1_gen": "3"},
        dtoverlays=["disable-bt", "disable-wifi"],
    )
    assert after == BOOKWORM + (
        "\n[board-type=0x17]\nusb_max_current_enable=1\ndtparam=pciex1_gen=3\n"
        "dtoverlay=disable-bt\ndtoverlay=disable-wifi\n"
    )


def test_absent_removes_only_the_requested_lines_of_the_block():
    after = edit(BOOKWORM, "cm5", dtoverlays=["dwc2,dr_mode=host"], state="absent")
    assert changes(BOOKWORM, after) == ["-dtoverlay=dwc2,dr_mode=host"]
    assert after.endswith("\n[cm5]\n\n[all]\n")
    after = edit(BOOKWORM, "cm4", settings={"otg_mode": None}, state="absent")
    assert changes(BOOKWORM, after) == ["-otg_mode=1"]


def test_absent_does_not_reach_other_blocks():
    # audio, arm_boost and vc4-kms-v3d are in the leading lines; "all" is the final [all] block.
    for request in (
        {"dtparams": {"audio": None}},
        {"settings": {"arm_boost": None}},
        {"dtoverlays": ["vc4-kms-v3d"]},
    ):
        assert edit(BOOKWORM, "all", state="absent", **request) is BOOKWORM
    assert edit(BOOKWORM, "cm4", dtoverlays=["dwc2,dr_mode=host"], state="absent") is BOOKWORM
    assert edit(BOOKWORM, "pi5", settings={"otg_mode": None}, state="absent") is BOOKWORM


def test_commented_lines_do_not_count():
    without_all = BOOKWORM.removesuffix("\n[all]\n")
    after = edit(without_all, "all", dtparams={"i2c_arm": "on"}, settings={"arm_boost": "0"})
    assert changes(without_all, after) == ["-arm_boost=1", "+arm_boost=0", "+dtparam=i2c_arm=on"]
    assert "\n#dtparam=i2c_arm=on\n" in after
    assert "\narm_boost=0\ndtparam=i2c_arm=on\n\n[cm4]\n" in after
    text = "#arm_freq=2400\n[pi5]\n#arm_freq=2400\n"
    assert edit(text, "pi5", settings={"arm_freq": "2800"}) == text + "arm_freq=2800\n"


def test_nothing_to_do_returns_the_same_string():
    assert edit(BOOKWORM, "all") is BOOKWORM
    assert edit(BOOKWORM, "pi5", state="absent", dtparams={"pciex1": None}) is BOOKWORM
    assert edit(BOOKWORM, "cm4", settings={"otg_mode": "1"}) is BOOKWORM
    assert edit(BOOKWORM, "cm5", dtoverlays=["dwc2,dr_mode=host"]) is BOOKWORM


# --------------------------------------------------------------------------- the hand-edited file


def test_a_param_on_a_multi_param_line_is_rewritten_alone():
    after = edit(HAND_EDITED, "pi5", dtparams={"pciex1_gen": "3", "pciex1": None})
    assert changes(HAND_EDITED, after) == ["-dtparam=pciex1,pciex1_gen=2  ", "+dtparam=pciex1,pciex1_gen=3  "]
    after = edit(HAND_EDITED, "all", dtparams={"i2c_arm": "off", "audio": "off"})
    assert changes(HAND_EDITED, after) == ["-dtparam=audio=off,i2c_arm=on", "+dtparam=audio=off,i2c_arm=off"]


def test_a_bare_param_and_a_valued_param_differ():
    after = edit(HAND_EDITED, "pi5", dtparams={"pciex1": "on"})
    assert changes(HAND_EDITED, after) == [
        "-dtparam=pciex1,pciex1_gen=2  ",
        "+dtparam=pciex1=on,pciex1_gen=2  ",
    ]
    assert edit(after, "pi5", dtparams={"pciex1": None}) == HAND_EDITED


def test_absent_takes_a_param_out_of_a_multi_param_line():
    after = edit(HAND_EDITED, "all", dtparams={"audio": None}, state="absent")
    assert changes(HAND_EDITED, after) == ["-dtparam=audio=off,i2c_arm=on", "+dtparam=i2c_arm=on"]
    after = edit(HAND_EDITED, "pi5", dtparams={"pciex1": None, "pciex1_gen": None}, state="absent")
    assert changes(HAND_EDITED, after) == ["-dtparam=pciex1,pciex1_gen=2  "]


def test_indented_settings_are_edited_in_place():
    assert edit(HAND_EDITED, "pi5", settings={"usb_max_current_enable": "1"}) is HAND_EDITED
    after = edit(HAND_EDITED, "pi5", settings={"usb_max_current_enable": "0"})
    assert changes(HAND_EDITED, after) == ["-  usb_max_current_enable=1", "+  usb_max_current_enable=0"]


def test_lines_added_to_a_block_that_is_not_last_go_before_its_blank_lines():
    after = edit(HAND_EDITED, "pi5", dtoverlays=["pciex1-compat-pi5,no-mip"])
    assert "  usb_max_current_enable=1\ndtoverlay=pciex1-compat-pi5,no-mip\n\n\n[all]\n" in after
    assert changes(HAND_EDITED, after) == ["+dtoverlay=pciex1-compat-pi5,no-mip"]
    assert not after.endswith("\n")


def test_the_missing_final_newline_stays_missing():
    after = edit(HAND_EDITED, "all", settings={"gpu_mem": "16"})
    assert after == HAND_EDITED + "\ngpu_mem=16"
    after = edit(HAND_EDITED, "pi500", settings={"usb_max_current_enable": "1"})
    assert after == HAND_EDITED + "\n\n[pi500]\nusb_max_current_enable=1"


def test_only_the_last_all_block_is_edited():
    # The first [all] block (with "#enable_uart=1") is not the target; enable_uart=1 already is.
    assert edit(HAND_EDITED, "all", settings={"enable_uart": "1"}) is HAND_EDITED
    after = edit(HAND_EDITED, "all", settings={"enable_uart": "0"})
    assert after == HAND_EDITED.removesuffix("enable_uart=1") + "enable_uart=0"


# --------------------------------------------------------------------------- corner cases


def test_the_last_of_repeated_keys_wins_and_absent_removes_all():
    text = "[pi5]\narm_freq=2400\narm_freq=2800\n[all]\n"
    assert edit(text, "pi5", settings={"arm_freq": "2800"}) is text
    after = edit(text, "pi5", settings={"arm_freq": "3000"})
    assert after == "[pi5]\narm_freq=2400\narm_freq=3000\n[all]\n"
    assert edit(text, "pi5", settings={"arm_freq": None}, state="absent") == "[pi5]\n[all]\n"


def test_spaces_around_equals_make_another_key():
    text = "[pi5]\narm_freq = 2400\n"
    assert edit(text, "pi5", settings={"arm_freq": "2400"}) == text + "arm_freq=2400\n"


def test_crlf_files_get_crlf_lines():
    text = "dtparam=audio=on\r\n[all]\r\n"
    after = edit(text, "all", settings={"arm_boost": "1"})
    assert after == "dtparam=audio=on\r\n[all]\r\narm_boost=1\r\n"
    after = edit(text, "pi5", dtparams={"pciex1": None})
    assert after == text + "\r\n[pi5]\r\ndtparam=pciex1\r\n"
    assert edit(after, "pi5", dtparams={"pciex1": None}) is after


def test_an_empty_file():
    assert edit("", "all", settings={"arm_boost": "1"}) == "arm_boost=1\n"
    assert edit("", "pi5", dtparams={"pciex1": None}) == "[pi5]\ndtparam=pciex1\n"
    assert edit("", "pi5", dtparams={"pciex1": None}, state="absent") == ""


def test_state_and_section_are_checked():
    with pytest.raises(ConfigTxtError, match=r"^state 'gone' is not present or absent$"):
        edit(BOOKWORM, "all", state="gone")
    with pytest.raises(ConfigTxtError, match=r"^section 'pi6' is not a config\.txt filter"):
        edit(BOOKWORM, "pi6", settings={"arm_boost": "1"})


def test_a_validated_request_checks_the_section_first():
    request = EditRequest.validated(
        "pi5", {"arm_freq": 2800}, {"pciex1": None, "audio": True}, ["disable-bt"]
    )
    assert request == EditRequest(
        "pi5", {"arm_freq": "2800"}, {"pciex1": None, "audio": "on"}, ("disable-bt",), "present"
    )
    absent = EditRequest.validated("all", {"arm_freq": None}, {"pciex1_gen": 3}, None, "absent")
    assert absent == EditRequest("all", {"arm_freq": None}, {"pciex1_gen": None}, (), "absent")
    with pytest.raises(ConfigTxtError, match=r"^section 'pi6' is not"):
        EditRequest.validated("pi6", {"arm boost": 1})
    with pytest.raises(ConfigTxtError, match=r"^state 'latest' is not present or absent$"):
        EditRequest.validated("pi5", state="latest")


REQUESTS = [
    ("all", {"dtparams": {"pciex1": None, "pciex1_gen": "3"}}),
    ("pi5", {"dtoverlays": ["disable-bt", "pciex1-compat-pi5,no-mip"], "settings": {"arm_freq": "2800"}}),
    ("cm4", {"settings": {"otg_mode": "0"}, "dtparams": {"audio": "off"}}),
    ("all", {"dtparams": {"audio": "off", "i2c_arm": "on"}}),
    ("gpio4=1", {"settings": {"enable_uart": "1"}}),
    ("pi5", {"dtparams": {"pciex1": None}, "state": "absent"}),
    ("cm5", {"dtoverlays": ["dwc2,dr_mode=host"], "state": "absent"}),
]


@pytest.mark.parametrize("fixture", ["bookworm-config.txt", "pi5-hand-edited-config.txt"])
@pytest.mark.parametrize(("section", "request_args"), REQUESTS)
def test_round_trip_edit_then_edit_again_changes_nothing(fixture, section, request_args):
    original = (FIXTURES / fixture).read_text()
    first = edit(original, section, **request_args)
    second = edit(first, section, **request_args)
    assert second == first
    assert second.encode() == first.encode()
    # Lines the request does not name are all still there, in order.
    kept = [line[1:] for line in difflib.ndiff(original.split("\n"), first.split("\n")) if line[:1] == " "]
    removed = [line for line in changes(original, first) if line.startswith("-")]
    assert len(kept) + len(removed) == len(original.split("\n"))
