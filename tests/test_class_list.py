"""The class list of the Cell map: keys follow the rows, and a class moved up gets a key."""

import numpy as np
from qtpy.QtWidgets import QApplication, QLineEdit

from napari_reddino.cell_map import MUTED
from napari_reddino.widgets.class_list import DEFAULT_CLASSES, KEY, LABELLED, NEW_CLASS_COLOURS, ClassList

MUTED_HEX = "#" + "".join(f"{round(channel * 255):02x}" for channel in MUTED[:3])


def test_a_class_moved_up_takes_the_key_of_its_new_row_with_its_colour_and_counts(qtbot):
    classes = ClassList()
    qtbot.addWidget(classes)
    changes = []
    classes.changed.connect(lambda: changes.append(classes.classes))
    row = classes.classes.index("hypochromia")
    assert row == 10 and classes.table.item(row, KEY).text() == ""  # the eleventh class has no key ...
    assert "move this class Up to give it one" in classes.table.item(row, KEY).toolTip()
    classes.set_counts({"hypochromia": 7}, {})

    classes.table.selectRow(row)
    classes.move_current(-1)  # ... until it is moved up
    assert classes.classes[9:11] == ["hypochromia", "schistocyte"]
    assert classes.class_for_key("0") == "hypochromia" and classes.current_class == "hypochromia"
    assert classes.table.item(10, KEY).text() == "" and classes.table.item(9, LABELLED).text() == "7"
    assert classes.hex_colours == DEFAULT_CLASSES  # every class keeps its colour
    assert len(changes) == 1

    classes.table.selectRow(0)
    classes.move_current(-1)  # the first cannot go higher
    assert classes.classes[0] == "normal" and len(changes) == 1
    classes.move_current(+1)
    assert classes.classes[:2] == ["macrocyte", "normal"] and classes.class_for_key("2") == "normal"
    # A name typed after a move renames the class of that row, not the one that was there.
    classes.table.item(1, 1).setText("normal cell")
    assert classes.classes[:2] == ["macrocyte", "normal cell"]
    # A name still being typed when the class is moved goes with its class.
    classes.show()
    classes.activateWindow()
    qtbot.waitUntil(classes.isActiveWindow)  # focus moves only in the active window
    renamed = []
    classes.renamed.connect(lambda old, new: renamed.append((old, new)))
    classes.table.setCurrentCell(1, 1)
    classes.table.editItem(classes.table.item(1, 1))
    editor = QApplication.focusWidget()
    assert isinstance(editor, QLineEdit) and classes.table.isAncestorOf(editor)
    editor.setText("normocyte")
    classes.move_current(-1)
    assert classes.classes[:2] == ["normocyte", "macrocyte"] and renamed == [("normal cell", "normocyte")]


def test_a_name_that_is_empty_or_taken_is_undone_and_says_why(qtbot):
    classes = ClassList()
    qtbot.addWidget(classes)
    said, renamed = [], []
    classes.refused.connect(said.append)
    classes.renamed.connect(lambda old, new: renamed.append((old, new)))
    row = classes.classes.index("macrocyte")
    classes.table.item(row, 1).setText(" normal ")
    classes.table.item(row, 1).setText("  ")
    assert classes.classes[row] == "macrocyte" and classes.table.item(row, 1).text() == "macrocyte"
    assert said == ["There is already a class 'normal'; 'macrocyte' keeps its name.",
                    "A class needs a name; 'macrocyte' keeps its name."]
    classes.table.item(row, 1).setText("macrocyte ")  # its own name with a space: no rename (which clears Undo label)
    assert classes.table.item(row, 1).text() == "macrocyte" and len(said) == 2
    assert renamed == []
    classes.table.item(row, 1).setText("Normal")  # a colleague's spelling: one class's cells split in two
    assert classes.classes[row] == "macrocyte" and said[-1] == (
        "There is already a class 'normal' ('Normal' in another case); 'macrocyte' keeps its name.")
    normal = classes.classes.index("normal")
    classes.table.item(normal, 1).setText("Normal")  # a class's own name in another case is a rename
    assert classes.classes[normal] == "Normal" and renamed == [("normal", "Normal")]


def test_a_class_added_with_an_id_another_class_holds_gets_its_own(qtbot):
    # A saved head's class whose id now belongs to another class (removed, its id's class
    # renamed to the removed one's name): two classes must not share an id, or a rename of one
    # would be carried to the other.
    classes = ClassList()
    qtbot.addWidget(classes)
    normal = classes.id_of("normal")
    classes.add_class("discocyte", class_id=normal)
    assert classes.name_of(normal) == "normal" and classes.id_of("discocyte") not in (None, normal)
    classes.add_class("echinocyte", class_id="an id of a head saved in another session")
    assert classes.id_of("echinocyte") == "an id of a head saved in another session"


def test_the_last_class_stays_and_says_why(qtbot):
    classes = ClassList({"normal": "#ffffff", "spherocyte": "#ff0000"})
    qtbot.addWidget(classes)
    said, asked = [], []
    classes.refused.connect(said.append)
    classes.remove_requested.connect(asked.append)
    classes.table.selectRow(1)
    classes.remove_current()
    assert asked == ["spherocyte"] and said == []  # the owner is asked (and removes it)
    classes.remove("spherocyte")
    classes.table.selectRow(0)
    classes.remove_current()
    assert asked == ["spherocyte"] and classes.classes == ["normal"]
    assert said == ["The last class stays: add another class before removing this one."]


def _lab(colour: str):
    from skimage.color import rgb2lab

    return rgb2lab(np.array([[[int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]]]))[0, 0]


def test_class_colours_stay_apart_from_each_other_the_unlabelled_grey_and_the_map(qtbot):
    """"other" was the grey of unlabelled cells and schistocytes black on the map's black: both
    vanished; some colours of added classes were 7 (CIEDE2000) from a default's."""
    from skimage.color import deltaE_ciede2000

    classes = ClassList()
    qtbot.addWidget(classes)
    for number in range(40):  # past the palette: round the hue circle, never grey
        classes.add_class(f"added {number}")
    colours = list(classes.hex_colours.values())
    assert len(set(colours)) == len(colours) == len(DEFAULT_CLASSES) + 40
    grey_and_map = [MUTED_HEX, "#000000", "#ffffff"]  # unlabelled cells; the map's background and selection ring
    palette = [*DEFAULT_CLASSES.values(), *NEW_CLASS_COLOURS]
    for index, colour in enumerate(palette):
        others = palette[:index] + palette[index + 1:] + grey_and_map
        assert min(deltaE_ciede2000(_lab(colour), _lab(other)) for other in others) > 12, colour
    for colour in colours[len(palette):]:
        assert min(deltaE_ciede2000(_lab(colour), _lab(other)) for other in grey_and_map) > 12, colour
