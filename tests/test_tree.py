import json

import networkx as nx
import pytest

from branchnas.errors import UserError
from branchnas.tree import TREE_FORMAT, Tree

TASKS = ["seg", "depth", "normals", "edges"]
POINTS = ["layer1", "layer2", "layer3"]


def example() -> Tree:
    return Tree(
        [[[0, 1, 2, 3]], [[0, 1, 2], [3]], [[0, 1], [2], [3]]],
        tasks=TASKS,
        points=POINTS,
    )


def test_canonical_form_makes_equal_layouts_equal_and_hash_alike():
    a = example()
    b = Tree([[["edges", "normals", "depth", "seg"]], [["edges"], [2, 0, 1]], [[3], [2], [1, 0]]],
             tasks=TASKS, points=POINTS)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.partitions[1] == ((0, 1, 2), (3,))
    assert a != a.with_names(points=["b1", "b2", "b3"])
    assert a != Tree([[[0, 1, 2, 3]], [[0, 1, 2], [3]], [[0], [1, 2], [3]]], tasks=TASKS, points=POINTS)


def test_groups_per_point_group_of_and_the_extreme_trees():
    tree = example()
    assert tree.groups_per_point() == (1, 2, 3)
    assert tree.group_of("normals", "layer3") == (2,)
    assert tree.group_of(0, 1) == (0, 1, 2)
    assert Tree.all_shared(3, 2).partitions == (((0, 1, 2),), ((0, 1, 2),))
    assert Tree.all_separate(3, 2).groups_per_point() == (3, 3)
    assert Tree.all_shared(2, 1).tasks == ("task0", "task1") and Tree.all_shared(2, 1).points == ("point0",)
    with pytest.raises(UserError, match="unknown branch point"):
        tree.group_of(0, "layer9")


@pytest.mark.parametrize(
    ("partitions", "message"),
    [
        ([[[0, 1, 2]]], "misses task 'edges'"),
        ([[[0, 1, 2, 3], [1]]], "'depth' appears twice"),
        ([[[0, 1, 2, 3], []]], "empty group"),
        ([[["seg", "depht", "normals", "edges"]]], "did you mean 'depth'"),
        ([[[0, 1, 2, 7]]], "task index 7"),
        ([[[0, 1], [2, 3]], [[0, 2], [1], [3]]], "'seg' and 'normals' in one group, but 'layer1' before it separates"),
        ([], "at least one branch point"),
    ],
)
def test_invalid_partitions_raise_one_clear_user_error(partitions, message):
    points = POINTS[: max(1, len(partitions))] if partitions else None
    with pytest.raises(UserError, match=message):
        Tree(partitions, tasks=TASKS, points=points)


def test_names_must_match_and_be_unique():
    with pytest.raises(UserError, match="2 partitions but 3 branch point names"):
        Tree([[[0, 1]], [[0], [1]]], tasks=["a", "b"], points=POINTS)
    with pytest.raises(UserError, match="task name 'a' appears twice"):
        Tree([[[0, 1]]], tasks=["a", "a"])
    with pytest.raises(UserError, match="give the task names"):
        Tree([[["a", "b"]]])


def test_tree_is_immutable():
    with pytest.raises(AttributeError):
        example().tasks = ("x",)


def test_json_round_trip_with_names_as_dict_text_and_file(tmp_path):
    tree = example()
    data = tree.to_json()
    assert data["format"] == TREE_FORMAT
    assert data["partitions"][1] == [["seg", "depth", "normals"], ["edges"]]
    assert Tree.from_json(data) == tree
    assert Tree.from_json(json.dumps(data)) == tree
    tree.save(tmp_path / "tree.json")
    assert Tree.load(tmp_path / "tree.json") == tree
    assert [p.name for p in tmp_path.iterdir()] == ["tree.json"]  # no temp file left


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"format": "other/2", "tasks": [], "points": [], "partitions": []}, "expected format"),
        ({"tasks": ["a"], "points": ["p"]}, "lacks 'partitions'"),
        ({"tasks": ["a"], "points": ["p"], "partitions": [["a"]]}, "lists of task-name lists"),
        ("{not json", "not valid JSON"),
    ],
)
def test_from_json_rejects_malformed_data(data, message):
    with pytest.raises(UserError, match=message):
        Tree.from_json(data)


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tree.load(tmp_path / "nope.json")


def test_networkx_graph_has_stem_blocks_and_heads_and_round_trips():
    tree = example()
    graph = tree.to_networkx()
    assert nx.is_arborescence(graph)
    assert graph.number_of_nodes() == 1 + sum(tree.groups_per_point()) + tree.num_tasks
    leaves = sorted(n for n in graph if graph.out_degree(n) == 0)
    assert leaves == [("head", t) for t in range(4)]
    assert graph.nodes[(1, (0, 1, 2))]["point"] == "layer2"
    assert graph.nodes[(1, (0, 1, 2))]["tasks"] == ("seg", "depth", "normals")
    assert graph.nodes[("head", 3)]["task"] == "edges"
    assert set(graph.successors((2, (0, 1)))) == {("head", 0), ("head", 1)}
    assert Tree.from_networkx(graph) == tree


def test_from_networkx_rejects_edges_that_do_not_match_the_blocks():
    graph = example().to_networkx()
    graph.remove_edge((1, (3,)), (2, (3,)))
    graph.add_edge((1, (0, 1, 2)), (2, (3,)))
    with pytest.raises(UserError, match="edges do not match"):
        Tree.from_networkx(graph)
    bare = nx.DiGraph()
    with pytest.raises(UserError, match="graph attributes"):
        Tree.from_networkx(bare)


def test_render_shows_branch_point_spans_and_task_names():
    assert example().render() == "\n".join([
        "stem: shared by all 4 tasks",
        "└── layer1 {seg, depth, normals, edges}",
        "    ├── layer2 {seg, depth, normals}",
        "    │   ├── layer3 {seg, depth}",
        "    │   │   ├── seg",
        "    │   │   └── depth",
        "    │   └── layer3 → normals",
        "    └── layer2..layer3 → edges",
    ])
    assert Tree.all_separate(2, 3, tasks=["a", "b"]).render() == "\n".join([
        "stem: shared by all 2 tasks",
        "├── point0..point2 → a",
        "└── point0..point2 → b",
    ])


def test_draw_writes_a_png(tmp_path):
    path = tmp_path / "tree.png"
    example().draw(path, title="example")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 2000
