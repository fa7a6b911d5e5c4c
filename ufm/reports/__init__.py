"""What is shown and written: plotly figures, HTML run reports, the paper reproduction."""
