"""Every Flax module of the project: autoencoders, classifier, score networks, score ratios."""

import dataclasses


def from_config(module_cls, section, **fixed):
  """Builds `module_cls` from a config section: `fixed`, then every other field it has.

  A field of the module that the section does not hold keeps its default, and
  keys of the section that are not fields (training settings) are ignored, so
  a module and the config section it is built from cannot drift apart.

  Args:
    module_cls: a flax.linen Module class (a dataclass).
    section: a ConfigDict or mapping.
    **fixed: fields given by the caller (they win over the section).
  """
  names = {f.name for f in dataclasses.fields(module_cls)} - {"parent", "name"}
  kwargs = {k: section[k] for k in names - set(fixed) if k in section}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return module_cls(**fixed, **kwargs)
