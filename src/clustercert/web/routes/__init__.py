"""The console's routers, one per area like the API's; ``web/app.py`` includes them."""
