"""CSV/TSV through pyarrow (data.tables): every cell as written, each record at the line an editor shows."""

from __future__ import annotations

import csv

import pytest

from iclcls.data import DataError, load_examples
from iclcls.data.tables import read_table


@pytest.mark.parametrize(
    "data, cells, lines",
    [
        # quoted line breaks, blank lines inside, no final line end
        (b'text,label\n"first\nrow",a\nok,a\n\n\n,b\nlast,b', [["first\nrow", "ok", "", "last"], ["a", "a", "b", "b"]], [2, 4, 7, 8]),
        # BOM, CRLF (kept inside a quoted cell), blank lines before the header
        (b'\xef\xbb\xbf\r\n\ntext,label\r\n"a\r\nb",x\r\n\r\nc,y\r\n', [["a\r\nb", "c"], ["x", "y"]], [4, 7]),
        (b"text,label\ra,b\r\rc,d\r", [["a", "c"], ["b", "d"]], [2, 4]),  # old Mac line ends
        (b'text,label\n"",""\nq,r\n', [["", "q"], ["", "r"]], [2, 3]),  # quoted empties are a row, not blank
        (b'"te\nxt",label\nab"c,NA\n"q"x,007\n', [['ab"c', "qx"], ["NA", "007"]], [3, 4]),  # a header on two lines
        (b"text,label", [[], []], []),  # a header alone, without a line end
    ],
)
def test_cells_and_lines_are_what_the_csv_module_reads(tmp_path, data, cells, lines):
    p = tmp_path / "d.csv"
    p.write_bytes(data)
    t = read_table(p)
    assert list(t.data.values()) == cells and (t.lines or []) == lines
    if lines:  # the stdlib reader, for reference
        with open(p, newline="", encoding="utf-8-sig") as f:
            assert [r for r in csv.reader(f) if r][1:] == [list(r) for r in zip(*cells)]


def test_headerless_unquoted_tsv_keeps_quotes_as_text(tmp_path):
    p = tmp_path / "g.tsv"
    p.write_bytes(b'a "b\tx\t1\n\nc\t"d"\t2\n')
    t = read_table(p, delimiter="\t", columns=("text", "ids", "cid"), quote=False)
    assert t.data == {"text": ['a "b', "c"], "ids": ["x", '"d"'], "cid": ["1", "2"]} and t.lines == [1, 3]


@pytest.mark.parametrize(
    "data, where",
    [
        (b'text,label\n"a\n\nb",x\n\nb\n', "line 6: has 1 fields, expected 2 (text, label)"),
        (b"text,label\n\n\na,b,c\n", "line 4: has 3 fields, expected 2"),
        (b"a,b,a\n1,2,3\n", "line 1: the header repeats column 'a'"),
        (b"\n\n", "file has no header row"),
    ],
)
def test_errors_name_file_and_line(tmp_path, data, where):
    p = tmp_path / "d.csv"
    p.write_bytes(data)
    with pytest.raises(DataError, match="d.csv") as e:
        read_table(p)
    assert where in str(e.value)


def test_a_cell_larger_than_a_read_block_loads(tmp_path):
    big = "x" * 3_000_000 + ', "q"\n line'
    p = tmp_path / "big.csv"
    p.write_text('text,label\n"' + big.replace('"', '""') + '",a\nsmall,b\n', encoding="utf-8")
    limit = csv.field_size_limit()
    exs = load_examples(p)
    assert [e.text for e in exs] == [big, "small"] and exs[1].id is None
    assert csv.field_size_limit() == limit  # no process-wide setting changed
