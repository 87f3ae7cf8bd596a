"""What happens after the decoder: the product pasted back exactly (`compose`), and selling points
typeset into their boxes (`typeset`) with fonts chosen by glyph coverage (`fonts`)."""
