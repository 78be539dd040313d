"""Tooling for the Jupyter Book: build it, vendor its browser assets, execute its labs.

``python -m hybridpar.book build``     strict build (what ``make book`` runs), see :mod:`.build`
``python -m hybridpar.book labs ...``  execute labs with stored widget state, see :mod:`.run_labs`
``python -m hybridpar.book vendor``    re-fetch the vendored widget/MathJax JavaScript, see :mod:`.vendor`
"""
