"""The API's routers, one per resource; ``control/app.py`` includes them."""
