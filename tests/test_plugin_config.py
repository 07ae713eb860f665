"""Labeling configs -> ControlTag / ProjectConfig, and the errors for configs labelassist cannot fill in."""

import pytest

from labelassist.plugin.config import ControlTag, ProjectConfig, parse_label_config
from labelassist.plugin.errors import UnsupportedConfigError
from labelassist.workers.contract import Concept


def view(*body: str) -> str:
    return "<View>" + "".join(body) + "</View>"


IMG = '<Image name="img" value="$image"/>'

# (id, config, expected controls as (name, to_name, kind, value_key, threshold, ((label, prompts, threshold), ...)))
CONFIGS = [
    ("polygon", view(IMG, '<PolygonLabels name="poly" toName="img"><Label value="cat"/><Label value="dog"/></PolygonLabels>'),
     [("poly", "img", "polygonlabels", "image", None, (("cat", ("cat",), None), ("dog", ("dog",), None)))]),
    ("brush", view('<Image name="photo" value="$url"/>', '<BrushLabels name="mask" toName="photo"><Label value="sky"/></BrushLabels>'),
     [("mask", "photo", "brushlabels", "url", None, (("sky", ("sky",), None),))]),
    ("rectangle", view(IMG, '<RectangleLabels name="box" toName="img"><Label value="car"/></RectangleLabels>'),
     [("box", "img", "rectanglelabels", "image", None, (("car", ("car",), None),))]),
    ("synonyms", view(IMG, '<PolygonLabels name="p" toName="img"><Label value="cat" predicted_values="kitty, feline ,,cat"/></PolygonLabels>'),
     [("p", "img", "polygonlabels", "image", None, (("cat", ("cat", "kitty", "feline"), None),))]),
    ("thresholds", view(IMG, '<PolygonLabels name="p" toName="img" threshold="0.4"><Label value="cat" threshold="0.7"/><Label value="dog"/></PolygonLabels>'),
     [("p", "img", "polygonlabels", "image", 0.4, (("cat", ("cat",), 0.7), ("dog", ("dog",), 0.4)))]),
    ("alias names the result, value is the prompt",
     view(IMG, '<PolygonLabels name="p" toName="img"><Label value="tabby cat" alias="c1" predicted_values="kitten"/></PolygonLabels>'),
     [("p", "img", "polygonlabels", "image", None, (("c1", ("tabby cat", "kitten"), None),))]),
    ("labels nested in a View", view(IMG, '<PolygonLabels name="p" toName="img"><View><Label value="cat"/></View></PolygonLabels>'),
     [("p", "img", "polygonlabels", "image", None, (("cat", ("cat",), None),))]),
    ("attribute case ignored", view(IMG, '<PolygonLabels name="p" toName="img" Threshold="0.2"><Label value="cat" Predicted_Values="kitty"/></PolygonLabels>'),
     [("p", "img", "polygonlabels", "image", 0.2, (("cat", ("cat", "kitty"), 0.2),))]),
    ("other controls ignored",
     view(IMG, '<Choices name="q" toName="img"><Choice value="ok"/></Choices>', '<TextArea name="t" toName="img"/>',
          '<KeyPointLabels name="kp" toName="img" smart="true"><Label value="cat"/></KeyPointLabels>',
          '<PolygonLabels name="p" toName="img"><Label value="cat"/></PolygonLabels>'),
     [("p", "img", "polygonlabels", "image", None, (("cat", ("cat",), None),))]),
    ("several controls, two images",
     view(IMG, '<Image name="img2" value="$second"/>',
          '<PolygonLabels name="p" toName="img"><Label value="cat"/></PolygonLabels>',
          '<BrushLabels name="b" toName="img2"><Label value="dog"/></BrushLabels>',
          '<RectangleLabels name="r" toName="img"><Label value="cat"/><Label value="car"/></RectangleLabels>'),
     [("p", "img", "polygonlabels", "image", None, (("cat", ("cat",), None),)),
      ("b", "img2", "brushlabels", "second", None, (("dog", ("dog",), None),)),
      ("r", "img", "rectanglelabels", "image", None, (("cat", ("cat",), None), ("car", ("car",), None)))]),
]


@pytest.mark.parametrize("xml, expected", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_supported_configs(xml, expected):
    config = parse_label_config(xml)
    got = [(c.name, c.to_name, c.kind, c.value_key, c.threshold, tuple((k.name, k.prompts, k.threshold) for k in c.concepts))
           for c in config.controls]
    assert got == expected


ERRORS = [
    ("not XML", "<View><Image", "not valid XML"),
    ("empty", "   ", "expected XML text"),
    ("not a string", None, "expected XML text"),
    ("entity declaration", '<!DOCTYPE v [<!ENTITY x "y">]><View>&x;</View>', "DTDs and entity declarations"),
    ("nothing supported", view(IMG, '<Choices name="q" toName="img"><Choice value="a"/></Choices>'),
     "PolygonLabels, BrushLabels or RectangleLabels bound to an Image; the config has Choices 'q'"),
    ("no controls at all", view(IMG), "the config has no control tags"),
    ("missing Image", view('<PolygonLabels name="p" toName="nope"><Label value="a"/></PolygonLabels>'), "toName='nope' names no tag"),
    ("bound to Text", view('<Text name="t" value="$text"/>', '<PolygonLabels name="p" toName="t"><Label value="a"/></PolygonLabels>'),
     "is a <Text>; labelassist labels <Image> only"),
    ("no labels", view(IMG, '<BrushLabels name="b" toName="img"></BrushLabels>'), "BrushLabels 'b': has no <Label value=...> children"),
    ("static image", view('<Image name="img" value="http://x/y.png"/>', '<PolygonLabels name="p" toName="img"><Label value="a"/></PolygonLabels>'),
     "expected a task data key"),
    ("two images in toName", view(IMG, '<Image name="i2" value="$b"/>', '<PolygonLabels name="p" toName="img,i2"><Label value="a"/></PolygonLabels>'),
     "toName to name one Image"),
    ("threshold not a number", view(IMG, '<PolygonLabels name="p" toName="img" threshold="high"><Label value="a"/></PolygonLabels>'),
     "threshold: expected a number in [0, 1], got 'high'"),
    ("label threshold out of range", view(IMG, '<PolygonLabels name="p" toName="img"><Label value="a" threshold="1.5"/></PolygonLabels>'),
     "label 'a' threshold: expected a number in [0, 1]"),
    ("min_margin NaN", view(IMG, '<PolygonLabels name="p" toName="img" min_margin="nan"><Label value="a"/></PolygonLabels>'),
     "min_margin: expected a number in [0, 1]"),
    ("blank label", view(IMG, '<PolygonLabels name="p" toName="img"><Label value=" "/></PolygonLabels>'), "concept name"),
]


@pytest.mark.parametrize("xml, message", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_unsupported_configs_say_what_is_wrong(xml, message):
    with pytest.raises(UnsupportedConfigError) as err:
        parse_label_config(xml)
    assert message in str(err.value)
    assert err.value.code == "unsupported_config"


def test_concepts_union_keeps_order_merges_prompts_and_first_threshold():
    config = parse_label_config(view(
        IMG,
        '<PolygonLabels name="p" toName="img"><Label value="cat" predicted_values="kitty"/><Label value="dog"/></PolygonLabels>',
        '<BrushLabels name="b" toName="img" threshold="0.6"><Label value="sky"/><Label value="cat" predicted_values="feline"/></BrushLabels>',
    ))
    assert config.concepts() == (
        Concept("cat", ("cat", "kitty", "feline"), 0.6),
        Concept("dog", ("dog",), None),
        Concept("sky", ("sky",), 0.6),
    )


def test_scoring_overrides_take_the_strictest_control():
    config = parse_label_config(view(
        IMG,
        '<PolygonLabels name="p" toName="img" min_margin="0.1" image_gate_threshold="0.05"><Label value="a"/></PolygonLabels>',
        '<BrushLabels name="b" toName="img" min_margin="0.2"><Label value="b"/></BrushLabels>',
        '<RectangleLabels name="r" toName="img"><Label value="c"/></RectangleLabels>',
    ))
    assert config.scoring_overrides() == {"min_margin": 0.2, "image_gate_threshold": 0.05}
    assert parse_label_config(view(IMG, '<PolygonLabels name="p" toName="img"><Label value="a"/></PolygonLabels>')).scoring_overrides() == {}


def test_controls_by_image_key():
    config = parse_label_config(CONFIGS[-1][1])
    assert [c.name for c in config.controls_for("image")] == ["p", "r"]
    assert [c.name for c in config.controls_for("second")] == ["b"]
    assert config.value_keys() == ("image", "second")


def test_parse_is_cached_and_results_are_frozen():
    xml = CONFIGS[0][1]
    assert parse_label_config(xml) is parse_label_config(xml)
    with pytest.raises(AttributeError):
        parse_label_config(xml).controls[0].name = "x"


@pytest.mark.parametrize("build, message", [
    (lambda: ControlTag("p", "img", "ellipselabels", "image", (Concept("a"),)), "not one of"),
    (lambda: ControlTag("p", "img", "polygonlabels", "image", ()), "at least one label"),
    (lambda: ProjectConfig(()), "at least one"),
])
def test_direct_construction_is_validated(build, message):
    with pytest.raises(UnsupportedConfigError, match=message):
        build()
