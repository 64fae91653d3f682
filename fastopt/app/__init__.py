"""The training application behind the ``fastopt`` command (``fastopt.app.cli:main``; also
``python -m fastopt``): the top floor of the project, which nothing in the library imports.
Its modules, each importing only those above it in this list:

    config      Config (every setting of a run) and UsageError
    data        the digits, MNIST's IDX and .npz files, minibatches
    valley      optimizer paths on 2-D test problems (fastopt valley)
    recipes     models, optimizer presets, default learning rates, schedules; the optimizer
                hyper-parameters the command line offers, from the rules' declarations
    prepare     what every run sets up alike: device, threads, data, seeded model and optimizer
    loop        the training loop: epochs over batches, loss and accuracy, progress, hooks
    outputs     metrics.json / metrics.csv, the plots, the checkpoint file and --resume
    fullbatch   the full-batch runs on softmax regression (--model logreg; lbfgs, newton)
    train       the commands train and compare
    flags       the table of command-line flags, each declared once
    cli         argparse and the commands (fastopt train | compare | valley | bench)
"""
