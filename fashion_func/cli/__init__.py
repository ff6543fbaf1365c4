"""The command-line app on top of the library core: `fashion-func train|predict|export|speedrun`.

Everything that knows a flag lives here: argument parsing (`args`, `train`), the config and its
presets (`config`, `presets/`), the composition of the core from a config (`app`), launching
under torchrun (`launch`), device and process settings (`device`), and the other commands
(`predict` with `images` and `report`, `export`, `speedrun`, `summary`). The core below
(`fashion_func.*` outside this folder) imports nothing from here; its errors carry structured
reasons that these modules phrase with their flags.
"""
