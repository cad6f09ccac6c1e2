"""`joule demo`: the whole loop on one machine (``run``) and its live view (``view``)."""
