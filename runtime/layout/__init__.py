"""Layouts as data and maths, shared by the layout (RADM) and poster (PlanNet) pipelines: elements
and user-fixed boxes (`elements`), box geometry and NMS (`boxes`), post-processing and repairs
(`postprocess`), and quality metrics (`metrics`)."""
