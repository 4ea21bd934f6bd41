"""A study's units: (image, model, checkpoint, method), each scored with ybROAD (:mod:`.units`), run in this
process, in worker processes or on Ray actors (:mod:`.executors`). The driver that commits them to a
resumable store, its figures and ``study.html`` are :mod:`camanim.outputs.study`."""
