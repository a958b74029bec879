"""The Cell map's label keys over its smears.

While a map is shown, 1-9, 0 (a class each) and Backspace/Delete (clear) also work over the
map's cells layers: napari's own keys there (1 eraser, 2 brush, ...) would otherwise turn a
labelling key press into a tool that edits the cells. So does Ctrl+Z (undo the last labelling):
napari's paint undo there could only undo a stroke made before the map (a stroke takes the map
away, and these keys with it), which would take the map away too. The layers' hint in the
status bar says what the keys do instead, in every mode, and napari's keys and hint come back
with the map's end.
"""

import weakref

LABEL_KEYS = (*"1234567890", "Backspace", "Delete")  # a class's key assigns it; the last two clear
UNDO_KEY = "Control-Z"  # napari's Control: Cmd on a Mac
REDO_KEY = "Control-Shift-Z"  # napari's paint redo, as out of place there as its undo: said, not done
_BOUND = (*LABEL_KEYS, UNDO_KEY, REDO_KEY)
LABEL_KEYS_HELP = ("use <1>-<9>, <0> to give the selected cells a class (Cell map), <Backspace> or <Delete> to clear "
                   "it, <Ctrl+Z> to undo that")


class SmearKeys:
    """Sends the label keys pressed over the given cells layers to ``press``, held weakly: the
    layers may outlive the widget, and once it is gone the next key press gives napari its keys
    back (napari holds ``_on_mode`` weakly too, so its hint returns at the next mode change)."""

    def __init__(self, viewer, press):
        self._viewer = viewer
        self._press = weakref.WeakMethod(press)
        self._layers: list = []

    def bind(self, layers) -> None:
        self.release()
        self._layers = list(layers)
        for layer in self._layers:
            for key in _BOUND:
                layer.bind_key(key, self._key(key), overwrite=True)
            layer.events.mode.connect(self._on_mode, position="last")  # after napari writes its own
            self._show_help(layer)

    def release(self) -> None:
        for layer in self._layers:
            layer.events.mode.disconnect(self._on_mode)
            _give_back(layer)
        self._layers = []

    def _key(self, key: str):
        press = self._press

        def on_layer(layer):
            if (pressed := press()) is not None:
                pressed(key)
            else:
                _give_back(layer)
        return on_layer

    def _on_mode(self, event) -> None:
        self._show_help(event.source)

    def _show_help(self, layer) -> None:
        layer.help = LABEL_KEYS_HELP
        active = self._viewer.layers.selection.active
        if active is not None and active.name == layer.name:  # by name: a plugin's viewer hands out proxies
            self._viewer.help = LABEL_KEYS_HELP  # napari copies it only on its own events or a mouse move


def _give_back(layer) -> None:
    """napari's keys on ``layer`` and, through a mode event, its own hint."""
    for key in _BOUND:
        layer.bind_key(key, None)
    layer.events.mode(mode=layer.mode)
