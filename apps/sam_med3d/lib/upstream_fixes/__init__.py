"""Every place where the app corrects MONAI Label 0.8.5: one module per upstream defect.

Each module's docstring says what MONAI Label does, why the app changes it, and what would let us delete the
module; each has a test that fails without it. ``main.py`` installs them, in order, from
``SamMed3DApp.on_init_complete`` (the datastore index fix is a mixin of the app's datastores instead).
"""
