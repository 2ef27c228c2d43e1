"""Planning, scheduling, reading, writing and the CLI of loraforge."""

if __name__ == "pipeline":  # a bare `import pipeline` from the checkout root: not us
    from loraforge._checkout import step_aside

    step_aside(__name__, __file__)
else:
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("loraforge")
    except PackageNotFoundError:  # running from a source tree that was never installed
        __version__ = "0+unknown"
