"""vcl-dist: distributed visual contrastive learning on Ray."""
