"""Faithfulness metrics of maps: ROAD (:mod:`.road`) and its imputers (:mod:`.imputers`)."""
