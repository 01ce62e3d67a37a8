"""Code shared by the recipes: data, models, metrics and the one error type they raise."""


class RecipeError(ValueError):
    """Bad input to a recipe (dataset, model, method, preset, image size...).

    Raised before any training starts; the scripts print ``error: <message>`` on one line and exit
    with status 2, as argparse does for a bad flag.
    """
