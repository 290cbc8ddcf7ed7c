"""clipmodel.caption_views (tokenize.caption_views): extra train captions built from a caption's parts."""
from clipmodel.caption_views import caption_views, with_views

SEP = r"[(),;]"


def test_head_first_then_head_with_parts():
    views = caption_views("grinning face (cheerful, happy, smile)", 4, SEP)
    assert len(views) == 4
    assert views[0] == "grinning face"
    for v in views[1:]:
        head, *rest = v.split(", ")
        assert head == "grinning face" and rest and set(rest) <= {"cheerful", "happy", "smile"}


def test_deterministic_and_off_by_default():
    c = "cat (animal, pet)"
    assert caption_views(c, 3, SEP) == caption_views(c, 3, SEP)
    assert caption_views(c, 0, SEP) == []
    assert with_views([c], 0, SEP) == [c]


def test_single_part_caption_has_no_views():
    assert caption_views("ox", 4, SEP) == []
    assert with_views(["ox", "cat (pet)"], 1, SEP) == ["ox", "cat (pet)", "cat"]
