"""Scope narrower than a subscription, as ``az`` spells it: ``--resource-group``, ``--name``, ``--tag``.

A :class:`VmFilter` is a pure predicate on what a listing returns for a VM (its id's resource group
and name, and its tags), so that it can be applied to an ARM listing here and pushed into a Resource
Graph query later without changing its meaning. It only ever narrows: the configured scope
(``TARGET_SUBSCRIPTIONS``/``MANAGEMENT_GROUP_ID``, shared/scope.py) is checked for every VM as before,
whatever the filter says.

Semantics, as ``az`` has them:

- ``--resource-group`` and ``--name`` compare case-insensitively, as ARM compares resource group
  and resource names; repeated, a VM matches when it is in any of the groups (any of the names).
- ``--tag KEY[=VALUE]``: ``az``'s ``validate_tag`` splits at the first ``=``, and ``az resource
  list`` filters ``tagname eq KEY`` and adds ``tagvalue eq VALUE`` only when VALUE is not empty
  (Azure/azure-cli ``src/azure-cli-core/azure/cli/core/commands/validators.py``, ``validate_tag``;
  ``src/azure-cli/azure/cli/command_modules/resource/custom.py``,
  ``_list_resources_odata_filter_builder``): a key alone, or ``KEY=``, matches any value. Tag names
  are case-insensitive, tag values case-sensitive (MicrosoftDocs/azure-docs
  ``articles/azure-resource-manager/management/tag-resources.md``). ``az`` takes one ``--tag``;
  here it repeats: tags with different keys must all match, values given for one key are
  alternatives (``--tag env=prod --tag env=test`` is either).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field

from shared.model import VmId
from shared.vm import VmFacts


class FilterError(ValueError):
    """A filter option that cannot mean anything (an empty tag key, ``--name`` alone)."""


@dataclass(frozen=True, slots=True)
class TagFilter:
    """One tag key and the values any one of which matches (none: any value matches)."""

    key: str  # lower case: tag names are case-insensitive
    values: frozenset[str] = frozenset()  # case-sensitive; empty means any value

    def matches(self, tags: Mapping[str, str]) -> bool:
        for name, value in tags.items():
            if name.lower() == self.key:
                return not self.values or value in self.values
        return False


def parse_tag(text: str) -> tuple[str, str]:
    """``KEY[=VALUE]`` split at the first ``=`` as ``az`` does; the key may not be empty."""
    key, _, value = text.partition("=")
    if not key.strip():
        raise FilterError(f"--tag {text!r}: the tag name is empty (KEY or KEY=VALUE)")
    return key, value


@dataclass(frozen=True, slots=True)
class VmFilter:
    """Resource groups, names and tags a VM must match; an empty filter matches every VM."""

    resource_groups: frozenset[str] = frozenset()  # lower case
    names: frozenset[str] = frozenset()  # lower case
    tags: tuple[TagFilter, ...] = field(default_factory=tuple)

    @classmethod
    def from_options(
        cls, *, resource_groups: Iterable[str] = (), names: Iterable[str] = (), tags: Iterable[str] = ()
    ) -> VmFilter:
        """The filter of ``--resource-group``/``--name``/``--tag`` values; :class:`FilterError` if
        one cannot mean anything. ``--name`` needs ``--resource-group``, as with ``az vm show``."""
        groups = frozenset(g.strip().lower() for g in resource_groups)
        vm_names = frozenset(n.strip().lower() for n in names)
        if "" in groups:
            raise FilterError("--resource-group: the name is empty")
        if "" in vm_names:
            raise FilterError("--name: the name is empty")
        if vm_names and not groups:
            raise FilterError("--name needs --resource-group (a VM name is unique only in its group)")
        by_key: dict[str, set[str]] = {}
        any_value: set[str] = set()
        for text in tags:
            key, value = parse_tag(text)
            lowered = key.lower()
            by_key.setdefault(lowered, set())
            if value:
                by_key[lowered].add(value)
            else:
                any_value.add(lowered)
        tag_filters = tuple(
            TagFilter(key, frozenset() if key in any_value else frozenset(values))
            for key, values in by_key.items()
        )
        return cls(groups, vm_names, tag_filters)

    @property
    def empty(self) -> bool:
        return not (self.resource_groups or self.names or self.tags)

    def matches(self, vm_id: VmId, tags: Mapping[str, str]) -> bool:
        """Whether a VM with this id and these tags is selected (pure; no I/O)."""
        if self.resource_groups and vm_id.resource_group.lower() not in self.resource_groups:
            return False
        if self.names and vm_id.name.lower() not in self.names:
            return False
        return all(tag.matches(tags) for tag in self.tags)

    def describe(self) -> str:
        """The filter as the options that give it, for messages."""
        parts = [f"--resource-group {g}" for g in sorted(self.resource_groups)]
        parts += [f"--name {n}" for n in sorted(self.names)]
        for tag in self.tags:
            if tag.values:
                parts += [f"--tag {tag.key}={v}" for v in sorted(tag.values)]
            else:
                parts.append(f"--tag {tag.key}")
        return " ".join(parts)


async def filtered(listing: AsyncIterator[VmFacts], vm_filter: VmFilter) -> AsyncIterator[VmFacts]:
    """The VMs of ``listing`` that ``vm_filter`` selects, streamed in listing order."""
    async for vm in listing:
        if vm_filter.matches(vm.vm_id, vm.tags):
            yield vm
