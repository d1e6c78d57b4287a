"""Reading /metrics as Prometheus does, with prometheus-client's own parser."""

from prometheus_client.parser import text_string_to_metric_families

Figures = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_figures(text: str) -> Figures:
    """Every sample of a scrape, keyed by its name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def figure(figures: Figures, name: str, **labels: str) -> float:
    """One sample's value; 0 when the scrape does not show it (yet)."""
    return figures.get((name, frozenset(labels.items())), 0.0)


def total(figures: Figures, name: str) -> float:
    """A sample summed over all its labels, as Prometheus' sum() would."""
    return sum(value for (sample, _), value in figures.items() if sample == name)
