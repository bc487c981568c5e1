import pytest

from cfseg.vocab import Vocabulary, canonical_name, close_matches, natural_text


@pytest.mark.parametrize("name", ["right kidney", "kidney_right", "RightKidney", "Kidney (R)", "KIDNEY-RIGHT",
                                  "r kidney", "ren_right"])
def test_synonyms_are_one_class(name):
    assert canonical_name(name) == "kidney_right"


def test_other_names():
    assert canonical_name("Parotid Gland Left") == "parotid_gland_left"
    assert canonical_name("SpinalCord") == canonical_name("cord") == "spinal_cord"
    assert canonical_name("Brain Stem") == "brainstem"
    assert canonical_name("oesophagus") == "esophagus"
    assert canonical_name("vertebrae_L1") == "vertebrae_l1"  # not a side
    assert natural_text("kidney_left") == "left kidney"
    assert natural_text("spinal_cord") == "spinal cord"


@pytest.mark.parametrize("bad", ["", "   ", "123", None])
def test_empty_names_rejected(bad):
    with pytest.raises(ValueError):
        canonical_name(bad)


def test_vocabulary_index_and_errors():
    v = Vocabulary(["liver", "right kidney", "Spleen"])
    assert v.names == ["background", "liver", "kidney_right", "spleen"]
    assert v.index("RightKidney") == 2 and "kidney (r)" in v
    with pytest.raises(ValueError, match="did you mean liver"):
        v.index("livr")
    with pytest.raises(ValueError, match="twice"):
        Vocabulary(["liver", "Liver"])
    w = v.extend(["pancreas"])
    assert w.names[:4] == v.names and w.index("pancreas") == 4
    with pytest.raises(ValueError, match="already in the vocabulary"):
        v.extend(["kidney_right"])
    assert Vocabulary.union([["liver", "spleen"], ["Spleen", "stomach"]]).classes == ["liver", "spleen", "stomach"]
    assert close_matches("spleeen", v.classes) == ["spleen"]
