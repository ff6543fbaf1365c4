"""The command-line app on top of the library core: `fashion-func train|predict|export|speedrun`.

Everything that knows a flag lives here (README "Architecture" lists the modules). The core below
(`fashion_func.*` outside this folder) imports nothing from here; its errors carry structured
reasons that these modules phrase with their flags.
"""
