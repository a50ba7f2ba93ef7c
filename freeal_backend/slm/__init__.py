"""The small model side: split encoder, robust classifier and span tagger, selection, detection."""
