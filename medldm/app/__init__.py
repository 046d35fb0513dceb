"""`medldm app`: a local web page (Gradio) over ``Reconstructor``; ``pip install medldm[app]``.

``session`` does the work (inputs, run, downloads), ``views`` draws planes, ``page`` lays them out and serves.
"""
