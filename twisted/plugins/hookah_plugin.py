# Kept import-light: twistd imports every dropin to list its plugins.
from twisted.application.service import ServiceMaker

hookah = ServiceMaker(
    "hookah",
    "hookah.tap",
    "Hookah, the HTTP event engine: webhooks, a WebSub hub and streams.",
    "hookah",
)
