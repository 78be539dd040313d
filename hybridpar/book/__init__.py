"""Tooling for the Jupyter Book: build it, execute its labs, vendor its browser assets.

Commands::

    python -m hybridpar.book build            # strict full build (what `make book` runs), see .build
    python -m hybridpar.book labs LAB.ipynb   # = python -m hybridpar.book.run_labs LAB.ipynb, see .run_labs
    python -m hybridpar.book vendor           # re-fetch _assets/vendor/ from npm, see .vendor

Writing a chapter (``chapters/NN_name.md``, executed on every build):

* Copy the jupytext header of ``chapters/01_why_distribute.md`` (MyST notebook, kernel python3),
  add the file to ``_toc.yml``, and open with a ``runs-on-cpu`` or ``needs-gpus`` admonition
  (``:::{admonition} Runs on CPU`` / ``:class: runs-on-cpu``; see ``intro.md``).
* Show package code with ``literalinclude`` and ``:pyobject:``, never a pasted copy.
* Cite with ``{cite}`key``` (entries in ``references.bib``), link terms with ``{term}`KV cache```
  (add new ones to ``glossary.md``).
* Exercises: ``{exercise}`` with a ``:label:``, then ``{solution} label`` with ``:class: dropdown``
  (hidden until clicked).
* Widgets render in the static book from their state at the end of execution, but their Python
  callbacks do not run there, and every control the book shows must work (``tests/test_book.py``
  operates each one in Chromium). Precompute the views a control can reach and ``jslink`` the
  control to them (``hybridpar.viz.static.linked_stacks``, as
  ``hybridpar.viz.roofline_widget.roofline_explorer``). A widget whose controls call Python is
  kernel-only (``hybridpar.viz.static.KERNEL_ONLY_WIDGETS``): tag its cell ``remove-output`` (in a
  chapter, ``:tags: [remove-output]`` under the ``code-cell`` line) and say in the text that it
  needs a live kernel; show its precomputed twin beside it. Import ipywidgets/matplotlib inside
  functions.
* Cells must be quick (the whole build runs on 2 CPU cores) and deterministic: fix seeds.

Writing a lab (``labs/NN_name.ipynb``, rendered from stored outputs, re-run by nbval):

* Write the notebook, its title cell first (``# Lab NN: ...`` and the admonition; the install cell
  is added below it for you), with notebook metadata ``"hybridpar": {"min_gpus": 0}`` (or N, plus
  ``"accelerator": "GPU"`` for GPU labs); then ``python -m hybridpar.book.run_labs labs/NN_name.ipynb``
  and commit the result. GPU labs are run on a GPU machine.
* nbval compares every output after ``labs/nbval_sanitize.cfg``: start timing cells with
  ``# NBVAL_IGNORE_OUTPUT``; tag GPU-only cells ``nbval-skip``. Each lab must run in under two
  minutes on 2 CPU cores.
"""
